"""ONNX export: the encoder and one cached decoder step as graphs, decoded by the core's own greedy and beam loops.

`encoder.onnx`: src (B, S) ids or (B, S, F) values, src_keep (B, S) -> each decoder layer's cross-attention keys and
values (B, H, S, Dh), computed once per source. `decoder_step.onnx`: the newest tokens (R,) of R = B · beam rows,
src_keep, those keys and values, and each layer's self-attention cache (R, H, t, Dh) -> next-token logits (R, V) and
the caches grown to t + 1. Label domains and one-shot decoding also get `forward.onnx`: the teacher-forced logits
(B, T, V). Batch, lengths and rows are dynamic. A model with known-future covariates (`future_steps` H) has the
encoder also give their vectors (B, H, D), and the step take the one of its position (R, D; zeros past H).

`OnnxModel` runs them with ONNX Runtime behind the decoding contract of `EncoderDecoder` (`encode`,
`start_decoding`, `decode_step`, and the teacher-forced call), so `seq2seq.decoding`'s searches drive it unchanged.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from seq2seq.attention import padding_keep
from seq2seq.model import EncoderDecoder

ENCODER, STEP, FORWARD = "encoder.onnx", "decoder_step.onnx", "forward.onnx"
OPSET = 18


class _GrowingCache:
    """`KVCache`'s interface over plain tensors (R, H, t, Dh): appending concatenates, which a graph can express."""

    def __init__(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = k, v

    def append(self, k: Tensor, v: Tensor) -> None:
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)

    @property
    def length(self) -> int:
        return self.k.shape[2]

    def keys_values(self) -> tuple[Tensor, Tensor]:
        return self.k, self.v


class _Encoder(nn.Module):
    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_keep: Tensor) -> tuple[Tensor, ...]:
        memory = self.model.encode(src, src_keep)  # (B, S, D)
        kv = tuple(t for layer in self.model.decoder for t in layer.cross_attn.memory_keys_values(memory))
        future = self.model.future_vectors(memory, src_keep)
        return kv if future is None else (*kv, future)


class _Step(nn.Module):
    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, src_keep: Tensor, memory_kv: tuple[Tensor, ...],
                past: tuple[Tensor, ...], future: Tensor | None = None) -> tuple[Tensor, ...]:
        m = self.model
        y = m.tgt_embed(tokens[:, None])  # (R, 1, D)
        if future is not None:  # this position's known-future covariates (R, D)
            y = y + future[:, None]
        y = m.tgt_pos(y, offset=past[0].shape[2])  # at position t
        keep, present = padding_keep(m.memory_keep(src_keep)), []
        for i, layer in enumerate(m.decoder):
            cache = _GrowingCache(past[2 * i], past[2 * i + 1])
            y = layer.step(y, cache, (memory_kv[2 * i], memory_kv[2 * i + 1]), keep)
            present += [cache.k, cache.v]
        return m.head(m.decoder_norm(y))[:, 0], *present


class _Forward(nn.Module):
    def __init__(self, model: EncoderDecoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, src: Tensor, src_keep: Tensor, tgt_in: Tensor, tgt_keep: Tensor) -> Tensor:
        return self.model(src, src_keep, tgt_in, tgt_keep)


def _names(prefix: str, n_layers: int) -> list[str]:
    return [f"{prefix}_{kind}{i}" for i in range(n_layers) for kind in ("k", "v")]


# The exporter's notes on its own internals (optional operators it skips, initializers it merges).
QUIET = ("torch.onnx", "onnx_ir", "onnxscript")


def _export(graph: nn.Module, args: tuple, dynamic: tuple, inputs: list[str], outputs: list[str], path: Path) -> None:
    with ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")
        for name in QUIET:
            logger = logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        program = torch.onnx.export(graph, args, dynamic_shapes=dynamic, input_names=inputs, output_names=outputs,
                                    dynamo=True, opset_version=OPSET, verbose=False, report=False)
    program.save(str(path))


@torch.no_grad()
def export(model: EncoderDecoder, src_example: Tensor, out: Path, forward: bool) -> list[str]:
    """Write the graphs of `model` (eval mode) into `out`; `src_example` (B, S) or (B, S, F) fixes the source's
    dtype and feature count. Returns the files written."""
    spec, n = model.spec, len(model.decoder)
    model = model.eval()
    Dim = torch.export.Dim
    batch, rows = Dim("batch", min=1, max=1 << 16), Dim("rows", min=1, max=1 << 20)
    src_len = Dim("src_len", min=1, max=spec.max_positions)
    past = Dim("past", min=0, max=spec.max_positions - 1)
    B, S = 2, min(5, spec.max_positions)
    if model.future_steps:  # the known-future rows follow at least one real position
        S = model.future_steps + min(2, spec.max_positions - model.future_steps)
        src_len = Dim("src_len", min=model.future_steps + 1, max=spec.max_positions)
    src = src_example[:1, :1].expand(B, S, *src_example.shape[2:]).contiguous()
    src_keep = torch.ones(B, S, dtype=torch.bool)
    seq = {0: batch, 1: src_len}
    future = ["future"] if model.future_steps else []
    _export(_Encoder(model), (src, src_keep), (seq, seq), ["src", "src_keep"], [*_names("memory", n), *future],
            out / ENCODER)

    encoded = _Encoder(model)(src, src_keep)
    memory_kv = encoded[: 2 * n]
    R, t = 2 * B, min(3, spec.max_positions - 1)
    H, Dh = memory_kv[0].shape[1], memory_kv[0].shape[3]
    cache = tuple(torch.zeros(R, H, t, Dh) for _ in range(2 * n))
    tokens = torch.zeros(R, dtype=torch.long)
    args: tuple = (tokens, src_keep, memory_kv, cache)
    dynamic: tuple = ({0: rows}, seq, tuple({0: batch, 2: src_len} for _ in memory_kv),
                      tuple({0: rows, 2: past} for _ in cache))
    if future:
        args, dynamic = (*args, torch.zeros(R, spec.d_model)), (*dynamic, {0: rows})
    _export(_Step(model), args, dynamic,
            ["tokens", "src_keep", *_names("memory", n), *_names("past", n), *future],
            ["logits", *_names("present", n)], out / STEP)
    files = [ENCODER, STEP]
    if forward:
        tgt = torch.zeros(B, t, dtype=torch.long)
        tgt_len = Dim("tgt_len", min=1, max=spec.max_positions)
        _export(_Forward(model), (src, src_keep, tgt, torch.ones(B, t, dtype=torch.bool)),
                (seq, seq, {0: batch, 1: tgt_len}, {0: batch, 1: tgt_len}),
                ["src", "src_keep", "tgt_in", "tgt_keep"], ["logits"], out / FORWARD)
        files.append(FORWARD)
    return files


@dataclass
class OnnxState:
    """What incremental decoding carries: the source mask, the memory's keys and values (one row per source),
    and the self-attention caches (one row per hypothesis)."""

    src_keep: np.ndarray  # (B, S)
    memory_kv: list[np.ndarray]
    past: list[np.ndarray]
    future: np.ndarray | None = None  # (R, H, D) known-future covariates' vectors

    def reorder(self, index: Tensor) -> None:
        """Beam search: hypothesis row i continues row index[i]."""
        rows = index.numpy()
        self.past = [p[rows] for p in self.past]


class OnnxModel:
    """The exported graphs behind `EncoderDecoder`'s decoding contract, run on the CPU by ONNX Runtime."""

    device = torch.device("cpu")

    def __init__(self, path: Path, n_layers: int, n_kv_heads: int, head_dim: int, threads: int | None = None) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(path / name), options, providers=["CPUExecutionProvider"])

        self.encoder, self.step = session(ENCODER), session(STEP)
        self.forward = session(FORWARD) if (path / FORWARD).is_file() else None
        self.n_layers, self.n_kv_heads, self.head_dim = n_layers, n_kv_heads, head_dim
        self.future = "future" in {o.name for o in self.encoder.get_outputs()}
        self._step_names = ["tokens", "src_keep", *_names("memory", n_layers), *_names("past", n_layers)]

    def encode(self, src: Tensor, src_keep: Tensor) -> list[np.ndarray]:
        return self.encoder.run(None, {"src": src.numpy(), "src_keep": src_keep.numpy()})

    def start_decoding(self, memory: list[np.ndarray], src_keep: Tensor, max_len: int, beam: int = 1) -> OnnxState:
        rows = src_keep.shape[0] * beam
        empty = np.zeros((rows, self.n_kv_heads, 0, self.head_dim), dtype=np.float32)
        kv, future = memory[: 2 * self.n_layers], None
        if self.future:  # one row per hypothesis, as the eager model's state holds them
            future = np.repeat(memory[-1], beam, axis=0)
        return OnnxState(src_keep.numpy(), kv, [empty] * (2 * self.n_layers), future)

    def decode_step(self, tokens: Tensor, state: OnnxState) -> Tensor:
        feeds = dict(zip(self._step_names, [tokens.numpy(), state.src_keep, *state.memory_kv, *state.past],
                         strict=True))
        if state.future is not None:
            t, (R, H, D) = state.past[0].shape[2], state.future.shape
            feeds["future"] = state.future[:, t] if t < H else np.zeros((R, D), dtype=np.float32)
        logits, *state.past = self.step.run(None, feeds)
        return torch.from_numpy(logits)  # (R, V)

    def __call__(self, src: Tensor, src_keep: Tensor, tgt_in: Tensor, tgt_keep: Tensor) -> Tensor:
        """Teacher-forced logits (B, T, V); exported for label domains and one-shot decoding only."""
        if self.forward is None:
            raise RuntimeError("this export has no teacher-forced graph (forward.onnx); it is written for label "
                               "domains and one-shot decoding")
        feeds = {"src": src.numpy(), "src_keep": src_keep.numpy(), "tgt_in": tgt_in.numpy(),
                 "tgt_keep": tgt_keep.numpy()}
        return torch.from_numpy(self.forward.run(None, feeds)[0])
