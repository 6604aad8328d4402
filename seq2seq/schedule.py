"""Optimizer and learning-rate schedules: the paper's warm-up by default, alternatives by config.

The schedules that know where the run ends (`linear`, `wsd`, `cosine`) are shaped to the steps the run will take:
`optim.total_steps` when given, else the run's bound (`trainer.max_steps`, or `trainer.max_epochs` of batches), or,
for a run bounded by `trainer.max_time`, the steps its measured step rate allows (`seq2seq.budget`). The budgeted-
training literature found that when the end is known, decaying linearly to zero over the budget beats the step,
cosine and inverse-square-root shapes at every budget (Li et al., 2020, "Budgeted Training: Rethinking Deep Neural
Network Training Under Resource Constraints"), and that a constant rate with a short final cooldown is as good
(warm-up-stable-decay: Hägele et al., 2024, "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
Durations")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from seq2seq.errors import ConfigError
from seq2seq.schema import check, setting

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("noam", "constant", "cosine", "linear", "wsd")


@dataclass(frozen=True)
class OptimSpec:
    """The `optim:` config block. With `noam`, `lr` multiplies d_model^-0.5 · min(step^-0.5, step · warmup^-1.5);
    with the others it is the peak learning rate reached after linear warm-up."""

    block: ClassVar[str] = "optim"
    name: str = setting("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = setting(1.0, "noam: multiplier of the paper's schedule; the others: the peak learning rate",
                        minimum=0)
    betas: list[float] = setting([0.9, 0.98], "Adam's beta1, beta2, each in [0, 1)", minimum=0, maximum=0.9999)
    eps: float = setting(1e-9, "Adam's epsilon", minimum=0)
    weight_decay: float = setting(0.0, "decoupled weight decay (adamw) or L2 penalty (adam)", minimum=0)
    schedule: str = setting("noam", "learning-rate schedule after the warm-up: noam (inverse square root), "
                            "constant, cosine or linear decay to zero at the planned end, wsd (constant, then linear "
                            "to zero over the last `cooldown` of the steps)", choices=SCHEDULES)
    warmup_steps: int = setting(4000, "steps of linear warm-up (at most `warmup_fraction` of the planned steps)",
                                minimum=1)
    warmup_fraction: float | None = setting(None, "warm up over at most this share of the planned steps, so a "
                                            "short run (a slow machine's time budget) reaches its peak", minimum=0,
                                            maximum=1)
    cooldown: float = setting(0.2, "wsd: the share of the planned steps over which the rate decays to zero",
                              minimum=0, maximum=1)
    total_steps: int | None = setting(None, "the steps the schedule plans for (null: the run's bound; under "
                                      "trainer.max_time, what the measured step rate allows); how a time-bounded "
                                      "run is reproduced on another machine", minimum=1)
    label_smoothing: float = setting(0.1, "label smoothing of the training loss", minimum=0, maximum=1)
    token_weights: dict[str, float] = setting({}, "loss weight of target tokens by their piece, e.g. {'1': 8.0} "
                                              "for a rare positive label (others weigh 1)")
    focal_gamma: float = setting(0.0, "focal loss: scale each token's loss by (1 - p)^gamma; 0 = cross-entropy",
                                 minimum=0)
    ema_decay: float | None = setting(None, "keep an exponential moving average of the weights, ema = d · ema + "
                                      "(1 - d) · w after each step (e.g. 0.999): validated, checkpointed and scored "
                                      "in place of the weights", minimum=0)
    ema_warmup: int | None = setting(10, "the EMA's decay ramps up as min(d, (1 + n) / (w + n)) at update n, so "
                                     "the barely trained first weights fade out and the weights averaged are on "
                                     "average 1/w of training old until d caps the decay; null: d from the first "
                                     "update", minimum=2)

    def __post_init__(self) -> None:
        check(self)
        if len(self.betas) != 2:
            raise ConfigError(f"`optim.betas` must be two numbers [beta1, beta2], got {self.betas}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ConfigError(f"`optim.ema_decay` must lie between 0 and 1 (e.g. 0.999), got {self.ema_decay}")
        bad = {k: w for k, w in self.token_weights.items() if not isinstance(w, (int, float)) or w <= 0}
        if bad:
            raise ConfigError(f"`optim.token_weights` must map token pieces to positive numbers; got {bad}")
        # Pieces are strings, whatever the command line parsed them as (`{1: 8}`)
        object.__setattr__(self, "token_weights", {str(k): float(w) for k, w in self.token_weights.items()})
        if self.focal_gamma and self.label_smoothing:
            raise ConfigError("`optim.focal_gamma` and `optim.label_smoothing` do not combine; set one to 0")


@dataclass
class WarmupSchedule:
    """Multiplier of the base learning rate at optimizer step `step` (0-based, as LambdaLR counts).

    A plain dataclass, so LambdaLR saves it as plain data and checkpoints stay loadable with weights_only=True.
    """

    kind: str
    d_model: int
    warmup: int
    total: int
    cooldown: float = 0.2

    def __call__(self, step: int) -> float:
        s = step + 1
        if self.kind == "noam":
            return self.d_model**-0.5 * min(s**-0.5, s * self.warmup**-1.5)
        if s <= self.warmup:
            return s / self.warmup
        if self.kind == "constant":
            return 1.0
        if self.kind == "wsd":
            left = self.total - s  # steps after this one
            return min(1.0, max(0.0, left / max(1.0, self.cooldown * self.total)))
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        if self.kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def plan(self, spec: OptimSpec, total: int) -> None:
        """Shape the schedule to `total` steps: where it decays to, and a warm-up of at most `warmup_fraction`."""
        self.total = total
        self.warmup = warmup_for(spec, total)


def warmup_for(spec: OptimSpec, total: int) -> int:
    """The warm-up of a run of `total` steps: `warmup_steps`, capped at `warmup_fraction` of them."""
    if spec.warmup_fraction is None:
        return spec.warmup_steps
    return max(1, min(spec.warmup_steps, round(spec.warmup_fraction * total)))


def configure(spec: OptimSpec, model: nn.Module, d_model: int, total_steps: int) -> dict:
    """Lightning's `configure_optimizers` answer: the optimizer and a per-step schedule."""
    optimizer = OPTIMIZERS[spec.name](
        model.parameters(), lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay
    )
    total = spec.total_steps or total_steps
    schedule = WarmupSchedule(spec.schedule, d_model, warmup_for(spec, total), total, spec.cooldown)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
