"""The text domain's metrics: sacreBLEU's BLEU, chrF and chrF++ through torchmetrics, each with its signature."""

from __future__ import annotations

from typing import Any

import sacrebleu
from torch import Tensor
from torchmetrics.text import CHRFScore, SacreBLEUScore

from seq2seq.metrics import Signed
from seq2seq.registry import METRICS


def _sacrebleu_signature(metric: Any) -> str:
    """The signature sacreBLEU gives `metric` (a sacrebleu.metrics object) for one reference per segment."""
    metric.corpus_score(["a"], [["a"]])  # sacreBLEU states the reference count once it has seen references
    return str(metric.get_signature())


@METRICS.register("bleu")
class BLEU(SacreBLEUScore, Signed):
    """Corpus SacreBLEU (13a tokenization) on detokenized hypotheses and references, on the 0-100 scale; its
    `signature` is sacreBLEU's for the same settings (the scores equal sacreBLEU's: tests/test_text.py)."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenize="13a")
        self.detokenize = tokenizer.decode
        self.signature = _sacrebleu_signature(sacrebleu.metrics.BLEU(tokenize="13a"))

    def update(self, hyps: list[list[int]], refs: list[list[int]]) -> None:  # type: ignore[override]
        super().update([self.detokenize(h) for h in hyps], [[self.detokenize(r)] for r in refs])

    def compute(self) -> Tensor:
        return super().compute() * 100


@METRICS.register("chrf")
class ChrF(CHRFScore, Signed):
    """Corpus chrF (character 6-grams, no word n-grams: not chrF++) on detokenized text, on the 0-100 scale.

    Zero n-gram counts are smoothed as in the original chrF++.py, i.e. sacrebleu's `CHRF(eps_smoothing=True)`;
    sacrebleu's default differs in the second decimal on short corpora.
    """

    word_order = 0

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(n_word_order=self.word_order)
        self.detokenize = tokenizer.decode
        self.signature = _sacrebleu_signature(sacrebleu.metrics.CHRF(word_order=self.word_order,
                                                                     eps_smoothing=True))

    def update(self, hyps: list[list[int]], refs: list[list[int]]) -> None:  # type: ignore[override]
        super().update([self.detokenize(h) for h in hyps], [[self.detokenize(r)] for r in refs])

    def compute(self) -> Tensor:  # type: ignore[override]
        return super().compute() * 100


@METRICS.register("chrf++")
class ChrFPlusPlus(ChrF):
    """chrF++: chrF with word unigrams and bigrams as well (sacreBLEU's `CHRF(word_order=2)`)."""

    word_order = 2
