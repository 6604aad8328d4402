"""LoRA (Hu et al. 2021): low-rank adapters on the attention and feed-forward projections, the rest frozen.

An adapted projection's weight is W + (alpha / r) · B · A, with A (r, in) drawn as a linear layer's weight and B
(out, r) zero, so that training starts from the base model exactly. The sum is a parametrization of the weight
(`torch.nn.utils.parametrize`) rather than a second branch in `forward`: attention reads slices of its stacked
q/k/v weight directly (cross-attention, cached decoding), and every such read sees the adapted weight. `merge` folds
the adapters into the weights (export, inference, averaging); a merged model is an ordinary one.

There is no dropout on the adapters' input: a weight parametrization has no input to drop; `model.dropout` still
acts on every sublayer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from seq2seq.errors import ConfigError, some
from seq2seq.schema import check, setting

TARGETS = {"attention": ("self_attn.in_proj", "self_attn.out_proj", "cross_attn.in_proj", "cross_attn.out_proj"),
           "feed_forward": ("ff.w1", "ff.w2")}


@dataclass(frozen=True)
class LoRASpec:
    """The `model.lora` block: rank 0 trains every weight; rank r > 0 trains adapters only."""

    block: ClassVar[str] = "lora"
    rank: int = setting(0, "rank of the adapters (0: no adapters, every weight trains)", minimum=0)
    alpha: float = setting(16.0, "the adapters' output is scaled by alpha / rank", minimum=0)
    targets: list[str] = setting(["attention", "feed_forward"], "the projections adapted: attention (q, k, v and "
                                 "output of self- and cross-attention), feed_forward (both layers)")

    def __post_init__(self) -> None:
        check(self)
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ConfigError(f"`model.lora.targets` must name some of {', '.join(TARGETS)}, got {self.targets}")


class LowRank(nn.Module):
    """The parametrization W -> W + scale · B · A."""

    def __init__(self, out_features: int, in_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.empty(rank, in_features))
        self.b = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5))  # as nn.Linear draws its weight
        self.scale = scale

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.b @ self.a).to(weight.dtype) * self.scale


def adapted(model: nn.Module, spec: LoRASpec) -> list[str]:
    """The names of the projections `spec` adapts in `model` (an `EncoderDecoder`)."""
    suffixes = tuple(f".{name}" for target in spec.targets for name in TARGETS[target])
    return [name for name, _ in model.named_modules() if name.endswith(suffixes)]


def add_adapters(model: nn.Module, spec: LoRASpec) -> None:
    """Adapters on the projections `spec` names; every other weight frozen."""
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in adapted(model, spec):
        linear = modules[name]
        out_features, in_features = linear.weight.shape
        parametrize.register_parametrization(linear, "weight", LowRank(out_features, in_features, spec.rank,
                                                                       spec.alpha / spec.rank))
        linear.parametrizations.weight.original.requires_grad_(False)


def base_names(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A base model's weights (plain names) under the names they take in `model`, whose adapted weights are
    parametrized."""
    renamed = {f"{name}.weight": f"{name}.parametrizations.weight.original" for name, module in model.named_modules()
               if parametrize.is_parametrized(module, "weight")}
    return {renamed.get(name, name): value for name, value in state.items()}


def load_base(model: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """A base model's weights (plain names) into `model`, adapted or not; adapters keep their values. Any other
    missing or unexpected weight is a ConfigError naming `source`."""
    found = model.load_state_dict(base_names(state, model), strict=False)
    missing = [k for k in found.missing_keys if ".parametrizations.weight.0." not in k]
    if missing or found.unexpected_keys:
        raise ConfigError(f"{source} does not hold this model's weights: missing {some(missing, 5) or 'none'}, "
                          f"unexpected {some(found.unexpected_keys, 5) or 'none'}")


def merge(model: nn.Module) -> None:
    """Fold every adapter into its weight, in place: the model has no parametrizations left."""
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)

