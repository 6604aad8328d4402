"""Inference from a checkpoint alone: `Translator.from_checkpoint(path).translate([...])`.

Works for any domain whose outputs are text (translation, the synthetic tasks); beam size, length penalty and
n-best override the decoding settings the checkpoint was trained with.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from seq2seq.decoding import beam_search, max_length
from seq2seq.module import Seq2SeqModule


@dataclasses.dataclass
class Translator:
    module: Seq2SeqModule
    batch_size: int = 64

    @classmethod
    def from_checkpoint(cls, path: str | Path, batch_size: int = 64) -> Translator:
        return cls(Seq2SeqModule.from_checkpoint(path), batch_size)

    def translate(self, sources: list[Any], beam: int | None = None, length_penalty: float | None = None) -> list[str]:
        """The best output for each source, in input order."""
        return [best[0][1] for best in self.n_best(sources, 1, beam, length_penalty)]

    def n_best(self, sources: list[Any], n: int, beam: int | None = None,
               length_penalty: float | None = None) -> list[list[tuple[float, str]]]:
        """Up to `n` (score, output) pairs per source, best first; scores are length-penalized log-probabilities."""
        spec = self.module.decode_spec
        beam = max(beam or spec.beam, n)
        penalty = spec.length_penalty if length_penalty is None else length_penalty
        tok, out = self.module.tgt_tok, [[] for _ in sources]
        for idx, batch in self.module.source_batches(sources, self.batch_size):
            found = beam_search(self.module.model, batch.src, batch.src_keep, bos=tok.bos_id, eos=tok.eos_id,
                                max_len=max_length(batch.src_keep, spec.max_len_a, spec.max_len_b), beam=beam,
                                n_best=n, length_penalty=penalty, length_normalization=spec.length_normalization,
                                allowed=self.module.allowed, no_repeat_ngram=spec.no_repeat_ngram)
            for row, i in enumerate(idx):
                out[i] = [(float(found.scores[row, k]), tok.decode(_cut(found.tokens[row, k].tolist(), tok.eos_id)))
                          for k in range(n)]
        return out


def _cut(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids
