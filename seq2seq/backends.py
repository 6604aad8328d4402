"""Backends: what runs a model for a `Translator`. `Stepped` runs the core's searches over any model with
`EncoderDecoder`'s decoding contract (the eager model, an ensemble, the ONNX graphs of `seq2seq.export.onnx`);
`seq2seq.export.ctranslate2.CTranslate2Model` runs CTranslate2's own searches."""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

import torch
from torch import Tensor

from seq2seq.decoding import Decoder
from seq2seq.guides import Guide
from seq2seq.search import Hypotheses


class Backend(Protocol):
    """What runs a model for a `Translator`: batches of token ids (or feature values) on `device` in, decoded ids
    out. `name` says which engine (and precision) it is, for outputs' metadata."""

    name: str
    device: torch.device

    def best(self, decoder: Decoder, src: Tensor, src_keep: Tensor, guides: list[Guide] | None = None) -> Tensor:
        """The best output (B, L) of each source, EOS-padded; `guides` (one per source) steer the search."""

    def n_best(self, decoder: Decoder, src: Tensor, src_keep: Tensor, n: int,
               guides: list[Guide] | None = None) -> Hypotheses: ...

    def label_probabilities(self, decoder: Decoder, src: Tensor, src_keep: Tensor) -> Tensor: ...

    def score(self, decoder: Decoder, src: Tensor, src_keep: Tensor, tgt: list[list[int]]) -> list[list[float]]:
        """Log-probabilities of each target token and of the EOS after it, teacher-forced."""


@dataclasses.dataclass(frozen=True)
class Stepped:
    """The core's searches over a model with `EncoderDecoder`'s decoding contract: `device`, `encode`,
    `start_decoding`, `decode_step` (and the teacher-forced call for label probabilities)."""

    model: Any
    name: str = "eager"

    @property
    def device(self) -> torch.device:
        return self.model.device  # where the model is now: it may have moved since

    def best(self, decoder: Decoder, src: Tensor, src_keep: Tensor, guides: list[Guide] | None = None) -> Tensor:
        return decoder(self.model, src, src_keep, guides)

    def n_best(self, decoder: Decoder, src: Tensor, src_keep: Tensor, n: int,
               guides: list[Guide] | None = None) -> Hypotheses:
        return decoder.n_best(self.model, src, src_keep, n, guides)

    def label_probabilities(self, decoder: Decoder, src: Tensor, src_keep: Tensor) -> Tensor:
        return decoder.label_probabilities(self.model, src, src_keep)

    def score(self, decoder: Decoder, src: Tensor, src_keep: Tensor, tgt: list[list[int]]) -> list[list[float]]:
        """Through the cached decoding steps, as the searches see them."""
        T = 1 + max(len(t) for t in tgt)
        gold = torch.tensor([t + [decoder.eos] * (T - len(t)) for t in tgt], device=src_keep.device)  # (B, T)
        inputs = decoder.teacher_input(gold)
        state = self.model.start_decoding(self.model.encode(src, src_keep), src_keep, T)
        steps = [self.model.decode_step(inputs[:, k], state).float().log_softmax(-1) for k in range(T)]
        picked = torch.stack(steps, 1).gather(-1, gold[..., None])[..., 0]  # (B, T)
        return [row[: len(t) + 1] for row, t in zip(picked.tolist(), tgt, strict=True)]
