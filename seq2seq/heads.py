"""Output side of the model: heads map decoder states (B, T, D) to logits (B, T, V)."""

from __future__ import annotations

from torch import Tensor, nn

from seq2seq.linear import Linear
from seq2seq.registry import HEADS


class TiedHead(nn.Module):
    """A head whose output projection can share the target embedding's weight (V, D): `model.tie_output`."""

    def tie(self, weight: nn.Parameter) -> None:
        raise NotImplementedError


@HEADS.register("linear")
class LinearHead(TiedHead):
    """A linear projection to the target vocabulary; its weight can be tied to the target embedding."""

    def __init__(self, d_model: int, vocab_size: int, bias: bool = False) -> None:
        super().__init__()
        self.proj = Linear(d_model, vocab_size, bias=bias)

    @property
    def weight(self) -> nn.Parameter:
        return self.proj.weight

    def tie(self, weight: nn.Parameter) -> None:
        self.proj.weight = weight

    def forward(self, h: Tensor) -> Tensor:
        return self.proj(h)  # (B, T, V)
