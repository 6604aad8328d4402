"""Helpers for tests of the core and of plugins: small random models and batches with varied padding.

Shapes: B batch, S source length, T target length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seq2seq.embeddings import TokenEmbedding
from seq2seq.heads import LinearHead
from seq2seq.model import EncoderDecoder, ModelSpec

VOCAB = 23  # vocabulary of the random models; ids 0 pad, 1 bos, 2 eos
PAD, BOS, EOS = 0, 1, 2


def tiny_model(seed: int = 0, **spec: object) -> EncoderDecoder:
    """A small randomly initialised token-to-token model in eval mode (dropout off), output tied to input."""
    torch.manual_seed(seed)
    sizes = {"d_model": 32, "n_heads": 4, "n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 64,
             "dropout": 0.0, "max_positions": 64}
    model_spec = ModelSpec(**{**sizes, **spec})  # type: ignore[arg-type]
    head = LinearHead(model_spec.d_model, VOCAB)
    tgt = TokenEmbedding(VOCAB, model_spec.d_model, padding_idx=PAD)
    head.tie(tgt.weight)
    return EncoderDecoder(model_spec, TokenEmbedding(VOCAB, model_spec.d_model, padding_idx=PAD), tgt, head).eval()


def random_batch(seed: int = 1, S: int = 9, T: int = 7) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four examples of different lengths: src (B, S), src_keep (B, S), tgt (B, T), tgt_keep (B, T)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (4, S), generator=g)
    tgt = torch.randint(3, VOCAB, (4, T), generator=g)
    src_keep = torch.arange(S)[None] < torch.tensor([S, S - 3, 2, S - 1])[:, None]
    tgt_keep = torch.arange(T)[None] < torch.tensor([T, 2, T - 1, 4])[:, None]
    return src.masked_fill(~src_keep, PAD), src_keep, tgt.masked_fill(~tgt_keep, PAD), tgt_keep
