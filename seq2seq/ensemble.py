"""Ensembles: several models of one vocabulary decoding as one.

`Ensemble` keeps `EncoderDecoder`'s decoding contract (`encode`, `start_decoding`, `decode_step`, the
teacher-forced call), so every search, scoring and label probability runs over it unchanged. Its next-token
logits are the mean of the members' log-probabilities (a normalized geometric mean of their distributions, as
OpenNMT and Marian ensemble); the searches normalize them again. Members may differ in size and depth; their
tokenizers must be the same fitted ones (`Translator.ensemble` checks).

Shapes: B batch, S source length, T target length, V output vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seq2seq.model import DecoderState, EncoderDecoder


@dataclass
class EnsembleState:
    """One `DecoderState` per member, moved together."""

    members: list[DecoderState]

    def reorder(self, index: Tensor) -> None:
        for state in self.members:
            state.reorder(index)


class Ensemble(nn.Module):
    """The mean of the members' log-probabilities, with `EncoderDecoder`'s decoding contract."""

    def __init__(self, members: list[EncoderDecoder]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    @property
    def spec(self):
        return self.members[0].spec

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def _mean(self, logits: list[Tensor]) -> Tensor:
        return torch.stack([x.float().log_softmax(-1) for x in logits]).mean(0)

    def forward(self, src: Tensor, src_keep: Tensor, tgt_in: Tensor, tgt_keep: Tensor,
                select: Tensor | None = None) -> Tensor:
        """Teacher-forced mean log-probabilities (B, T, V), or (N, V) at the `select` positions."""
        return self._mean([m(src, src_keep, tgt_in, tgt_keep, select) for m in self.members])

    def encode(self, src: Tensor, src_keep: Tensor) -> list[Tensor]:
        """Each member's memory (B, S, D_member)."""
        return [m.encode(src, src_keep) for m in self.members]

    def start_decoding(self, memory: list[Tensor], src_keep: Tensor, max_len: int, beam: int = 1) -> EnsembleState:
        return EnsembleState([m.start_decoding(mem, src_keep, max_len, beam)
                              for m, mem in zip(self.members, memory, strict=True)])

    def decode_step(self, tokens: Tensor, state: EnsembleState) -> Tensor:
        """Feed the newest tokens (B,); the mean next-token log-probabilities (B, V)."""
        return self._mean([m.decode_step(tokens, s) for m, s in zip(self.members, state.members, strict=True)])
