"""Linear layers whose weights can be packed once for the many small products of incremental decoding.

A decoding step multiplies the same few rows (B, or B · beam) by the same weights, step after step. Inside
`packed_weights(rows)`, `linear` multiplies an input of exactly that many rows by a copy of the weight that MKL has
packed for its GEMM, made on first use and dropped when the block ends; elsewhere, and wherever the packed GEMM does
not apply (not a float32 CPU weight, gradients wanted, or CPU autocast on), it is `F.linear`. Rounding may differ
from `F.linear` in the last bits, as it does between any two GEMM kernels. Weights must not change inside the block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_MKL = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
_scope: ContextVar[tuple[int, dict] | None] = ContextVar("packed_weights", default=None)


@contextmanager
def packed_weights(rows: int) -> Iterator[None]:
    """Within this block, `linear` on inputs of `rows` rows uses weights packed for MKL's GEMM."""
    token = _scope.set((rows, {}) if _MKL else None)
    try:
        yield
    finally:
        _scope.reset(token)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., in) -> (..., out), through a packed weight inside `packed_weights`."""
    scope = _scope.get()
    if (scope is None or x.numel() != scope[0] * x.shape[-1] or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    rows, packs = scope
    key = (weight.data_ptr(), weight.shape, weight.stride())
    if key not in packs:  # the weight is held with its pack, so no other tensor can take its address in the block
        packable = weight.device.type == "cpu" and weight.dtype == torch.float32  # F.linear: x's device and dtype
        packs[key] = weight, torch.ops.mkl._mkl_reorder_linear_weight(weight, rows) if packable else None
    packed = packs[key][1]
    return F.linear(x, weight, bias) if packed is None else torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


class Linear(nn.Linear):
    """`nn.Linear` through `linear`: the same parameters and state-dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
