"""Autoregressive decoding over the encoder-decoder: greedy search on the key/value cache.

Shapes: B batch, S source length, L decoded length, V output vocabulary.
Search loops call `EncoderDecoder.decode_step`; the uncached path recomputes the whole prefix each step and exists
to prove the cache exact. A label domain passes `allowed` (V,) to restrict the search to its label set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seq2seq.model import EncoderDecoder


@dataclass
class DecodeSpec:
    """The `decode:` config block: at most a · source_length + b output tokens."""

    max_len_a: float = 1.0
    max_len_b: int = 10


def max_length(src_keep: Tensor, a: float, b: int) -> int:
    """Decoding budget a · (longest source in the batch) + b, at least one step."""
    return max(1, int(a * int(src_keep.sum(1).max()) + b))


def _pick(logits: Tensor, allowed: Tensor | None) -> Tensor:
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return logits.argmax(-1)  # (B,)


@torch.no_grad()
def greedy(
    model: EncoderDecoder,
    src: Tensor,
    src_keep: Tensor,
    *,
    bos: int,
    eos: int,
    max_len: int,
    allowed: Tensor | None = None,
    use_cache: bool = True,
) -> Tensor:
    """Greedy search: tokens (B, L) without BOS, L <= max_len; positions after a row's EOS hold EOS.

    `allowed` is a boolean (V,) mask of tokens the search may emit (EOS must be among them).
    """
    memory = model.encode(src, src_keep)  # (B, S, D)
    B = src.shape[0]
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=src.device)  # (B, 1 + L)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    state = model.start_decoding(memory, src_keep, max_len) if use_cache else None
    for _ in range(max_len):
        if state is not None:
            logits = model.decode_step(tokens[:, -1], state)  # (B, V)
        else:
            keep = torch.ones_like(tokens, dtype=torch.bool)
            logits = model.head(model.decode(tokens, memory, src_keep, keep)[:, -1])  # (B, V)
        nxt = _pick(logits, allowed).masked_fill(done, eos)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
        done |= nxt == eos
        if bool(done.all()):
            break
    return tokens[:, 1:]


def strip(tokens: Tensor, eos: int) -> list[list[int]]:
    """(B, L) decoded tokens -> one list per row, cut before the first EOS."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out
