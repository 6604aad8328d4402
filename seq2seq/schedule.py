"""Optimizer and learning-rate schedules: the paper's warm-up by default, alternatives by config."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from seq2seq.errors import ConfigError
from seq2seq.schema import check, setting

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("noam", "constant", "cosine")


@dataclass(frozen=True)
class OptimSpec:
    """The `optim:` config block. With `noam`, `lr` multiplies d_model^-0.5 · min(step^-0.5, step · warmup^-1.5);
    with `constant` and `cosine` it is the peak learning rate reached after linear warm-up."""

    block: ClassVar[str] = "optim"
    name: str = setting("adam", "optimizer", choices=OPTIMIZERS)
    lr: float = setting(1.0, "noam: multiplier of the paper's schedule; constant/cosine: the peak learning rate",
                        minimum=0)
    betas: list[float] = setting([0.9, 0.98], "Adam's beta1, beta2, each in [0, 1)", minimum=0, maximum=0.9999)
    eps: float = setting(1e-9, "Adam's epsilon", minimum=0)
    weight_decay: float = setting(0.0, "decoupled weight decay (adamw) or L2 penalty (adam)", minimum=0)
    schedule: str = setting("noam", "learning-rate schedule", choices=SCHEDULES)
    warmup_steps: int = setting(4000, "steps of linear warm-up", minimum=1)
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

    def __call__(self, step: int) -> float:
        s = step + 1
        if self.kind == "noam":
            return self.d_model**-0.5 * min(s**-0.5, s * self.warmup**-1.5)
        if s <= self.warmup:
            return s / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (s - self.warmup) / max(1, self.total - self.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def configure(spec: OptimSpec, model: nn.Module, d_model: int, total_steps: int) -> dict:
    """Lightning's `configure_optimizers` answer: the optimizer and a per-step schedule."""
    optimizer = OPTIMIZERS[spec.name](
        model.parameters(), lr=spec.lr, betas=tuple(spec.betas), eps=spec.eps, weight_decay=spec.weight_decay
    )
    schedule = WarmupSchedule(spec.schedule, d_model, spec.warmup_steps, total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
