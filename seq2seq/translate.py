"""Inference, in one home: `Translator` turns raw sources into outputs through the module's one `Decoder`.

`Translator.from_checkpoint(path).translate([...])` needs nothing but the checkpoint. Every command (`evaluate`,
`predict`, `translate`), the domains' hooks and the Python API decode through it; `with_decoding(beam=5)` changes
the decoding settings the checkpoint was trained with.

Shapes: N inputs, L decoded length, C labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seq2seq.data import Batch, Collate
from seq2seq.decoding import Decoder, strip
from seq2seq.errors import ConfigError, DataError
from seq2seq.model import EncoderDecoder
from seq2seq.module import Seq2SeqModule


@dataclasses.dataclass(frozen=True)
class Translator:
    """Decodes raw sources with a module's model; `decoder` defaults to the module's (its `decode:` config)."""

    module: Seq2SeqModule
    batch_size: int = 64
    decoder: Decoder = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.decoder is None:
            object.__setattr__(self, "decoder", self.module.decoder)

    @classmethod
    def from_checkpoint(cls, path: str | Path, batch_size: int | None = None) -> Translator:
        module = Seq2SeqModule.from_checkpoint(path)
        return cls(module, batch_size or module.config.loader.batch_size)

    def with_decoding(self, **changes: Any) -> Translator:
        """The same model with other `decode:` settings (e.g. `beam=5`); None leaves a setting as it is."""
        changes = {k: v for k, v in changes.items() if v is not None}
        try:
            spec = dataclasses.replace(self.decoder.spec, **changes)
        except TypeError as err:
            raise ConfigError(f"unknown decoding setting: {err}") from None
        return dataclasses.replace(self, decoder=dataclasses.replace(self.decoder, spec=spec))

    def batches(self, sources: list[Any]) -> Iterator[tuple[list[int], Batch]]:
        """Encode raw sources and batch them by length: (input positions, batch) on the module's device."""
        module = self.module
        encoded = [module.src_tok.encode(s) for s in sources]
        limit = module.model.spec.max_positions
        bad = [i for i, s in enumerate(encoded, 1) if not 0 < len(s) <= limit]
        if bad:
            raise DataError(f"input(s) {bad[:10]} ({len(bad)} in all, numbered from 1) are empty or longer than "
                            f"the model's {limit} positions; shorten or split them")
        collate = Collate.for_tokenizers(module.src_tok, module.tgt_tok)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield idx, collate([(encoded[i], torch.empty(0, dtype=torch.long)) for i in idx]).to(module.device)

    def tokens(self, sources: list[Any]) -> list[list[int]]:
        """The decoded token ids of each source, cut at EOS, in input order."""
        out: list[list[int]] = [[] for _ in sources]
        with self._inference() as model:
            for idx, batch in self.batches(sources):
                hyps = strip(self.decoder(model, batch.src, batch.src_keep), self.decoder.eos)
                for i, hyp in zip(idx, hyps, strict=True):
                    out[i] = hyp
        return out

    def translate(self, sources: list[Any]) -> list[str]:
        """The output string of each source, in input order."""
        return [self.module.tgt_tok.decode(ids) for ids in self.tokens(sources)]

    def n_best(self, sources: list[Any], n: int) -> list[list[tuple[float, str]]]:
        """`n` (score, output) pairs per source by beam search, best first; scores are length-penalized
        log-probabilities."""
        tok, out = self.module.tgt_tok, [[] for _ in sources]
        with self._inference() as model:
            for idx, batch in self.batches(sources):
                found = self.decoder.n_best(model, batch.src, batch.src_keep, n)
                for row, i in enumerate(idx):
                    hyps = strip(found.tokens[row], tok.eos_id)  # (N, L) -> N lists
                    out[i] = [(float(found.scores[row, k]), tok.decode(hyps[k])) for k in range(n)]
        return out

    def label_probabilities(self, sources: list[Any]) -> Tensor:
        """Label domains: (N, L, C) probability of each label per decoded position, in input order."""
        with self._inference() as model:
            parts = [(idx, self.decoder.label_probabilities(model, batch.src, batch.src_keep).cpu())
                     for idx, batch in self.batches(sources)]
        out = torch.empty(len(sources), *parts[0][1].shape[1:])
        for idx, probs in parts:
            out[idx] = probs
        return out

    @contextmanager
    def _inference(self) -> Iterator[EncoderDecoder]:
        """The model in eval mode (dropout off) without gradients; the module's mode is restored afterwards."""
        module, was_training = self.module, self.module.training
        module.eval()
        try:
            with torch.no_grad():
                yield module.model
        finally:
            module.train(was_training)
