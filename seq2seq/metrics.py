"""Sequence-level metrics through torchmetrics, registered in `METRICS`.

A metric's `update` takes decoded hypotheses and references as token-id lists, one per example, cut at EOS.
Its constructor may ask for the target `tokenizer` as context (to detokenize, e.g. for BLEU).
States are sums, so values are exact across processes. A metric that can say exactly how it was computed (sacreBLEU's
signature string, say) subclasses `Signed`; training and `evaluate` write its `signature` to metrics.json.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torchmetrics import Metric

from seq2seq.registry import METRICS


class Signed:
    """A metric with a `signature`: how its scores were computed, in the form its users cite."""

    signature: str


def signatures(metrics: Mapping[str, Metric]) -> dict[str, str]:
    """name -> signature of the `Signed` metrics among `metrics`."""
    return {name: metric.signature for name, metric in metrics.items() if isinstance(metric, Signed)}


@METRICS.register("exact_match")
class ExactMatch(Metric):
    """Share of examples whose decoded sequence equals the reference exactly."""

    higher_is_better = True
    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, hyps: list[list[int]], refs: list[list[int]]) -> None:
        self.correct += sum(h == r for h, r in zip(hyps, refs, strict=True))
        self.total += len(refs)

    def compute(self) -> torch.Tensor:
        return self.correct.float() / self.total.clamp(min=1)
