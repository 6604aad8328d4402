"""CTranslate2 export: the core's weights mapped onto `ctranslate2.specs.TransformerSpec` through its Python API.

The core is the paper's Transformer, which the spec describes directly: post- or pre-norm (the pre-norm stacks' final
norms), ReLU or GELU, sinusoidal or learned positions (our table is written as the spec's position encodings, so the
two agree on layout), embeddings scaled by √d_model, fused q/k/v (self-attention) and k/v (cross-attention)
projections, a tied or separate output projection. A source that is not token ids or a component the spec has no
place for is refused by name. `CTranslate2Model` decodes with CTranslate2's own greedy and beam search.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from seq2seq.decoding import Decoder
from seq2seq.domain import Tokenizer
from seq2seq.embeddings import SinusoidalPositions, TokenEmbedding
from seq2seq.errors import ConfigError
from seq2seq.guides import Guide
from seq2seq.heads import LinearHead
from seq2seq.model import EncoderDecoder
from seq2seq.search import Hypotheses

QUANTIZATIONS = ("none", "int8", "int8_float32", "bfloat16")
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which the core uses


def vocabulary(tok: Tokenizer, side: str) -> list[str]:
    """The token strings of ids 0..V-1 (`Tokenizer.pieces`); CTranslate2 names tokens, so they must be distinct."""
    pieces = tok.pieces(list(range(tok.vocab_size)))
    if len(set(pieces)) != len(pieces):
        raise ConfigError(f"the {side} tokenizer ({type(tok).__name__}) gives the same piece to several ids; "
                          "CTranslate2 needs distinct token strings: export format=onnx")
    return pieces


def _refuse(model: EncoderDecoder, src_tok: object) -> None:
    if not isinstance(src_tok, Tokenizer):
        raise ConfigError(f"CTranslate2 takes token sources; this model's source encoder ({type(src_tok).__name__}) "
                          "gives feature values: export format=onnx")
    if model.future_steps:
        raise ConfigError("CTranslate2's decoder has no input for known-future covariates: export format=onnx")
    spec = model.spec
    if spec.positions not in ("sinusoidal", "learned") or spec.n_kv_heads not in (None, spec.n_heads):
        raise ConfigError(f"CTranslate2's encoder-decoder Transformer takes added position tables and multi-head "
                          f"attention; this model has `model.positions={spec.positions}`, `model.n_kv_heads="
                          f"{spec.n_kv_heads}`: export format=onnx")
    for where, module, kind in (("source embedding", model.src_embed, TokenEmbedding),
                                ("target embedding", model.tgt_embed, TokenEmbedding),
                                ("output head", model.head, LinearHead)):
        if type(module) is not kind:
            raise ConfigError(f"CTranslate2's Transformer has no place for the {where} {type(module).__qualname__} "
                              f"(it takes {kind.__qualname__}): export format=onnx")


def _array(t: Tensor) -> np.ndarray:
    # A copy each time: tied weights reach the spec as equal arrays, which it aliases itself. Handing it one array
    # object twice breaks its int8 quantization (log-probabilities off by thousands).
    return t.detach().float().cpu().numpy().copy()


def _linear(spec: object, weight: Tensor, bias: Tensor | None) -> None:
    spec.weight = _array(weight)
    if bias is not None:
        spec.bias = _array(bias)


def _norm(spec: object, norm: nn.LayerNorm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _positions(module: nn.Module) -> np.ndarray:
    return _array(module.pe if isinstance(module, SinusoidalPositions) else module.table.weight)


def convert(model: EncoderDecoder, src_tok: Tokenizer, tgt_tok: Tokenizer, out: Path, quantization: str) -> None:
    """Write `model` as a CTranslate2 model directory (model.bin, config.json, vocabularies) into `out`."""
    from ctranslate2.specs import common_spec, transformer_spec

    _refuse(model, src_tok)
    s, D = model.spec, model.spec.d_model
    activation = {"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,
                  "silu": common_spec.Activation.SWISH}[s.activation]
    spec = transformer_spec.TransformerSpec.from_config((s.n_encoder_layers, s.n_decoder_layers), s.n_heads,
                                                        pre_norm=s.norm_first, activation=activation)
    sides = ((False, spec.encoder, spec.encoder.embeddings[0], model.encoder, model.src_embed, model.src_pos,
              model.encoder_norm),
             (True, spec.decoder, spec.decoder.embeddings, model.decoder, model.tgt_embed, model.tgt_pos,
              model.decoder_norm))
    for decoder, stack_spec, embedding, layers, embed, positions, final_norm in sides:
        embedding.weight = _array(embed.weight)
        stack_spec.scale_embeddings = True
        stack_spec.position_encodings.encodings = _positions(positions)
        if s.norm_first:
            _norm(stack_spec.layer_norm, final_norm)
        for layer_spec, layer in zip(stack_spec.layer, layers, strict=True):
            attn = layer.self_attn
            _linear(layer_spec.self_attention.linear[0], attn.in_proj.weight, attn.in_proj.bias)
            _linear(layer_spec.self_attention.linear[1], attn.out_proj.weight, attn.out_proj.bias)
            _norm(layer_spec.self_attention.layer_norm, layer.norms[0])
            if decoder:
                cross = layer.cross_attn
                _linear(layer_spec.attention.linear[0], cross.in_proj.weight[:D], cross.in_proj.bias[:D])
                _linear(layer_spec.attention.linear[1], cross.in_proj.weight[D:], cross.in_proj.bias[D:])
                _linear(layer_spec.attention.linear[2], cross.out_proj.weight, cross.out_proj.bias)
                _norm(layer_spec.attention.layer_norm, layer.norms[1])
            _linear(layer_spec.ffn.linear_0, layer.ff.w1.weight, layer.ff.w1.bias)
            _linear(layer_spec.ffn.linear_1, layer.ff.w2.weight, layer.ff.w2.bias)
            _norm(layer_spec.ffn.layer_norm, layer.norms[-1])
    _linear(spec.decoder.projection, model.head.weight, model.head.proj.bias)
    src_vocab, tgt_vocab = vocabulary(src_tok, "source"), vocabulary(tgt_tok, "target")
    config = spec.config
    config.layer_norm_epsilon = LAYER_NORM_EPS
    config.bos_token = config.decoder_start_token = tgt_vocab[tgt_tok.bos_id]
    config.eos_token = tgt_vocab[tgt_tok.eos_id]
    config.unk_token = tgt_vocab[tgt_tok.pad_id]  # the core has no unknown-token id; PAD is never emitted
    spec.register_source_vocabulary(src_vocab)
    spec.register_target_vocabulary(tgt_vocab)
    spec.validate()
    spec.optimize(quantization=None if quantization == "none" else quantization)
    spec.save(str(out))


class CTranslate2Model:
    """A `Backend`: an exported model decoded by CTranslate2 (greedy, beam, sampling), token ids in and out.

    Target prefixes are CTranslate2's own: its outputs never end right after the prefix, and its scores leave the
    prefix's log-probability out. It has no per-input lexical constraints."""

    device = torch.device("cpu")

    def __init__(self, path: Path, src_tok: Tokenizer, tgt_tok: Tokenizer, name: str,
                 threads: int | None = None) -> None:
        import ctranslate2

        self.name = name
        self.translator = ctranslate2.Translator(str(path), device="cpu", inter_threads=1,
                                                 intra_threads=threads or torch.get_num_threads())
        self.src_vocab, self.tgt_vocab = vocabulary(src_tok, "source"), vocabulary(tgt_tok, "target")
        self.tgt_ids = {piece: i for i, piece in enumerate(self.tgt_vocab)}

    def _sources(self, src: Tensor, src_keep: Tensor) -> list[list[str]]:
        return [[self.src_vocab[i] for i in row[:n]] for row, n in zip(src.tolist(), src_keep.sum(1).tolist(),
                                                                        strict=True)]

    def _options(self, decoder: Decoder, src_keep: Tensor, beam: int, guides: list[Guide] | None) -> dict:
        spec = decoder.spec
        if spec.one_shot:
            raise ConfigError("CTranslate2 decodes autoregressively; `decode.one_shot=true` needs format=onnx")
        if spec.length_normalization == "gnmt" and spec.length_penalty != 0:
            raise ConfigError("CTranslate2 divides scores by length ** length_penalty, not by GNMT's "
                              "((5 + length) / 6) ** alpha: use `length_penalty=0`, or "
                              "`decode.length_normalization=average`")
        allowed = decoder.allowed(torch.device("cpu"))
        options = {
            "beam_size": beam, "max_decoding_length": decoder.max_len(src_keep, guides),
            "max_input_length": 0, "min_decoding_length": 0,  # CTranslate2's defaults: 1024 and 1; ours: no limits
            "length_penalty": 1.0 if spec.length_normalization == "average" else 0.0,
            "no_repeat_ngram_size": spec.no_repeat_ngram, "return_scores": True,
            "suppress_sequences": [[self.tgt_vocab[i]] for i in (~allowed).nonzero()[:, 0].tolist()],
        }
        if spec.sampling:
            options.update(sampling_topk=spec.top_k or len(self.tgt_vocab), sampling_topp=spec.top_p,
                           sampling_temperature=spec.temperature, beam_size=1)
        return options

    def _ids(self, pieces: list[str], eos: int, length: int) -> list[int]:
        ids = [self.tgt_ids[p] for p in pieces]
        return ids + [eos] * (length - len(ids))

    def n_best(self, decoder: Decoder, src: Tensor, src_keep: Tensor, n: int,
               guides: list[Guide] | None = None) -> Hypotheses:
        beam = max(decoder.spec.beam, n)
        prefix = None
        guides = decoder.steer(src.shape[0], guides)  # CTranslate2 does not score a prefix, forced or not
        if guides:
            if any(g.include or g.exclude for g in guides):
                raise ConfigError("CTranslate2 has no per-input lexical constraints; decode required or excluded "
                                  "terms with a checkpoint or an ONNX export (format=onnx)")
            prefix = [[self.tgt_vocab[i] for i in g.prefix] for g in guides]
        results = self.translator.translate_batch(self._sources(src, src_keep), target_prefix=prefix,
                                                  num_hypotheses=n, **self._options(decoder, src_keep, beam, guides))
        L = 1 + max(len(h) for r in results for h in r.hypotheses)
        tokens = torch.tensor([[self._ids(h, decoder.eos, L) for h in r.hypotheses] for r in results])  # (B, N, L)
        return Hypotheses(tokens, torch.tensor([r.scores for r in results]))

    def best(self, decoder: Decoder, src: Tensor, src_keep: Tensor, guides: list[Guide] | None = None) -> Tensor:
        return self.n_best(decoder, src, src_keep, 1, guides).tokens[:, 0]

    def label_probabilities(self, decoder: Decoder, src: Tensor, src_keep: Tensor) -> Tensor:
        raise ConfigError("label probabilities come from the teacher-forced graph of an ONNX export (format=onnx)")

    def score(self, decoder: Decoder, src: Tensor, src_keep: Tensor, tgt: list[list[int]]) -> list[list[float]]:
        """Per-token log-probabilities of the targets `tgt` (ids without EOS; the EOS's comes last)."""
        targets = [[self.tgt_vocab[i] for i in row] for row in tgt]
        return [r.log_probs for r in self.translator.score_batch(self._sources(src, src_keep), targets)]
