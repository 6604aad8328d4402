"""Linear layers whose weights can be packed for the many small products of incremental decoding.

A decoding step multiplies the same few rows (B, or B · beam) by the same weights, step after step. Inside
`packed_weights(rows)`, `linear` multiplies an input of exactly that many rows by a copy of the weight that MKL has
packed for its GEMM; elsewhere, and wherever the packed GEMM does not apply (not a float32 CPU weight, an inference
tensor, gradients wanted, or CPU autocast on), it is `F.linear`. Rounding may differ from `F.linear` in the last bits,
as it does between any two GEMM kernels.

A pack is made on first use and kept with its weight, for one row count at a time, until the weight is freed or
changes (its version counter moves): about the weight's size again in memory, saved on every later search.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

_MKL = torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
# The active block: its row count and the packs it has looked up, by the weight's address, shape and strides.
_scope: ContextVar[tuple[int, dict] | None] = ContextVar("packed_weights", default=None)
# Packs kept between blocks: weight's base tensor -> {(offset, shape, strides): (rows, version, pack)}.
_kept: WeakIdKeyDictionary = WeakIdKeyDictionary()


@contextmanager
def packed_weights(rows: int) -> Iterator[None]:
    """Within this block, `linear` on inputs of `rows` rows uses weights packed for MKL's GEMM.

    Weights must not change inside the block (between blocks they may: a changed weight is packed again).
    """
    token = _scope.set((rows, {}) if _MKL else None)
    try:
        yield
    finally:
        _scope.reset(token)


def _pack(weight: Tensor, rows: int) -> Tensor | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.is_inference():
        return None
    base = weight if weight._base is None else weight._base
    packs = _kept.setdefault(base, {})
    key = (weight.storage_offset(), weight.shape, weight.stride())
    rows_version_pack = packs.get(key)
    if rows_version_pack is None or rows_version_pack[:2] != (rows, weight._version):
        packs[key] = rows_version_pack = rows, weight._version, torch.ops.mkl._mkl_reorder_linear_weight(weight, rows)
    return rows_version_pack[2]


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear(x, weight, bias)`: x (..., in) -> (..., out), through a packed weight inside `packed_weights`."""
    if torch.compiler.is_compiling():  # compiled graphs (training) never decode step by step
        return F.linear(x, weight, bias)
    scope = _scope.get()
    if (scope is None or x.numel() != scope[0] * x.shape[-1] or torch.is_grad_enabled()
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    rows, seen = scope
    key = (weight.data_ptr(), weight.shape, weight.stride())
    if key not in seen:  # the weight is held with its pack, so no other tensor can take its address in the block
        seen[key] = weight, _pack(weight, rows)
    packed = seen[key][1]
    return F.linear(x, weight, bias) if packed is None else torch.ops.mkl._mkl_linear(x, packed, weight, bias, rows)


class Linear(nn.Linear):
    """`nn.Linear` through `linear`: the same parameters and state-dict keys."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
