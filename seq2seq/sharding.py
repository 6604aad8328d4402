"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the core, as `trainer=fsdp` applies it.

Each encoder and decoder layer is a group of its own, sharded over the data-parallel ranks; the rest (embeddings,
the tied head, the final norms) is the root's group. FSDP2 gathers a group's weights in its module's forward and
frees them after it, collectives every rank must join. Decoding calls other methods (`decode_step`, a layer's
`step`), and ranks finish their sentences at different steps, or hold different numbers of batches: so evaluation
gathers every group once, on every rank together (`gather`), decodes with no collective at all, and frees the
weights after it (`release`). Each rank then holds the model's weights during evaluation, not its gradients or
optimizer states.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from seq2seq.model import EncoderDecoder
from seq2seq.outputs import remove, replace_folder

PARAM_DTYPES = {"bf16-mixed": torch.bfloat16}  # trainer.precision -> the weights' dtype in forward and backward


def shard(model: EncoderDecoder, mesh: DeviceMesh, precision: str) -> None:
    """Shard `model` in place over `mesh` (1-D, the data-parallel ranks): a group per layer, then the root. Under
    `bf16-mixed` the gathered weights are bf16 and gradients are reduced in fp32; the sharded weights and the
    optimizer's states stay fp32."""
    dtype = PARAM_DTYPES.get(precision)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for layer in [*model.encoder, *model.decoder]:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def _layers(model: nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule) and m is not model]


def gather(model: nn.Module) -> None:
    """Every group's full weights in place, on every rank at once (a collective); forwards keep them until
    `release`."""
    # FSDP2 sets itself up in the root's first forward, and a layer's forward before it is an error: decoding
    # may come first (evaluation with no loss to compute). No public call does this yet.
    model._get_fsdp_state()._lazy_init()  # type: ignore[operator]
    for layer in _layers(model):
        layer.set_reshard_after_forward(False, recurse=False)
    for module in [model, *_layers(model)]:
        module.unshard()  # type: ignore[operator]


def release(model: nn.Module) -> None:
    """Back to shards: the gathered weights freed, forwards freeing them again (no collective)."""
    for layer in _layers(model):
        layer.set_reshard_after_forward(True, recurse=False)
    for module in [model, *_layers(model)]:
        module.reshard()  # type: ignore[operator]


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as `trainer=fsdp` uses it: data parallel over every rank of every node
    (tensor parallel 1); the module shards itself in `configure_model`. A checkpoint is a folder of shards, one per
    rank, written beside its target (`<name>.partial`) and renamed into place once every rank has written: a save
    cut short never leaves a folder that a resume would pick up."""

    def __init__(self) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        path = Path(self.broadcast(str(filepath)))
        partial = path.with_name(path.name + ".partial")
        if self.is_global_zero:
            remove(partial)  # a save cut short before
        self.barrier("partial checkpoint removed")
        super().save_checkpoint(checkpoint, partial, storage_options)
        self.barrier("checkpoint written")
        if self.is_global_zero:
            replace_folder(partial, path)
        self.barrier("checkpoint in place")


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """`model`'s full weights in place for the block (every rank enters it together), as they are if it is not
    sharded: for what runs on one rank alone, such as a domain's report."""
    if not is_sharded(model):
        yield
        return
    gather(model)
    try:
        yield
    finally:
        release(model)
