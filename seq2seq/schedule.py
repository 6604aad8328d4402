"""Optimizer and learning-rate schedules: the paper's warm-up by default, alternatives by config."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from seq2seq.errors import ConfigError

OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
SCHEDULES = ("noam", "constant", "cosine")


@dataclass
class OptimSpec:
    """The `optim:` config block. With `noam`, `lr` multiplies d_model^-0.5 · min(step^-0.5, step · warmup^-1.5);
    with `constant` and `cosine` it is the peak learning rate reached after linear warm-up."""

    name: str = "adam"  # adam | adamw
    lr: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-9
    weight_decay: float = 0.0
    schedule: str = "noam"  # noam | constant | cosine
    warmup_steps: int = 4000
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"`optim.name` must be one of {', '.join(OPTIMIZERS)}, got {self.name!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"`optim.schedule` must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.warmup_steps < 1:
            raise ConfigError(f"`optim.warmup_steps` must be >= 1, got {self.warmup_steps}")


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
