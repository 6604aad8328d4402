"""Checkpoint files: written atomically, read with clear errors, written on an interruption, averaged."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import OnExceptionCheckpoint

from seq2seq.errors import ConfigError, DataError, StorageError
from seq2seq.outputs import storage

log = logging.getLogger("seq2seq")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its target and renames it into place: a write cut short (a crash, a full disk,
    a killed job) leaves the previous file whole. Loads with `weights_only=True`: checkpoints hold plain data."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        partial = path.with_name(path.name + ".partial")
        kept = "the checkpoint there before is intact" if path.exists() else "no checkpoint was written there"
        try:
            with storage("the checkpoint", path, kept):
                path.parent.mkdir(parents=True, exist_ok=True)
                with open(partial, "wb") as f:
                    torch.save(checkpoint, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(partial, path)
        except StorageError:
            partial.unlink(missing_ok=True)  # the room it took
            raise

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's plain data (`weights_only=True`); a sharded one (a folder) consolidated (`consolidated`); a
    missing, truncated or foreign file is a ConfigError."""
    if Path(path).is_dir():
        return consolidated(Path(path))
    if not Path(path).is_file():
        raise ConfigError(f"`ckpt={path}`: no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # the unpickler fails in many ways on a file it cannot read
        raise ConfigError(f"`ckpt={path}` is not a readable checkpoint (truncated, or not written by seq2seq): "
                          f"{(str(err).splitlines() or [type(err).__name__])[0][:200]}") from None
    if not isinstance(ckpt, dict) or "hyper_parameters" not in ckpt:
        raise ConfigError(f"`ckpt={path}` is not a seq2seq checkpoint (it holds no config)")
    return ckpt


SHARDED_META = "meta.pt"  # in a sharded checkpoint's folder: everything but the weights and optimizer states


def consolidated(folder: Path) -> dict[str, Any]:
    """A sharded checkpoint (a folder of distributed-checkpoint shards, as `trainer=fsdp` writes) as one ordinary
    checkpoint: its full weights and everything else but the optimizer states, so it scores, decodes and exports
    but does not resume (resume from the folder). No process group is needed."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (folder / SHARDED_META).is_file():
        raise ConfigError(f"`ckpt={folder}` is a folder, and not a sharded checkpoint (it has no {SHARDED_META})")
    meta = read_checkpoint(folder / SHARDED_META)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            dcp_to_torch_save(folder, Path(scratch) / "full.pt")
        except (Exception, CheckpointException) as err:  # the reader fails in many ways (that one a BaseException)
            raise ConfigError(f"`ckpt={folder}`: its shards cannot be read ({str(err).splitlines()[0][:200]}); "
                              "is the folder whole?") from None
        state = torch.load(Path(scratch) / "full.pt", map_location="cpu", weights_only=True)["state_dict"]
    return {**{k: v for k, v in meta.items() if k != "optimizer_states"}, "state_dict": state}


def is_checkpoint(path: Path) -> bool:
    """Whether `path` is a checkpoint seq2seq wrote (readable, and holding a config)."""
    try:
        read_checkpoint(path)
    except ConfigError:
        return False
    return True


class InterruptCheckpoint(OnExceptionCheckpoint):
    """On Ctrl-C or an error, saves checkpoints/interrupted.ckpt and says how to continue."""

    by_user = False  # whether a run stopped for Ctrl-C (the command then exits 130, as shells expect)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        InterruptCheckpoint.by_user = isinstance(exception, KeyboardInterrupt)
        if isinstance(exception, (ConfigError, DataError)):  # a mistake: nothing to continue (or diverged weights)
            return
        super().on_exception(trainer, module, exception)
        if trainer.is_global_zero:
            run_dir = Path(self.dirpath).parent
            log.warning("stopped at step %d; the weights are in %s. Continue with the same command and "
                        "`resume=%s`", trainer.global_step, self.ckpt_path, run_dir)


# The data module resumes mid-epoch itself (`datamodule.Seq2SeqDataModule.state_dict`); Lightning cannot see that.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
# With `InterruptCheckpoint`, Lightning turns a fresh `fit(ckpt_path=None)` into "last", finds none and says so twice.
warnings.filterwarnings("ignore", message=r"`\.fit\(ckpt_path=None\)` was called without a model")
warnings.filterwarnings("ignore", message=r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint')


def average_checkpoints(paths: list[Path], read: Callable[[Path], dict[str, Any]] = read_checkpoint
                        ) -> dict[str, Any]:
    """A checkpoint whose weights are the element-wise mean of the weights of `paths` (checkpoints of one model:
    the same model config and fitted tokenizers), everything else from the last of them; optimizer and loop states
    are left out, so it scores, decodes and exports but does not resume. Means are taken in float64. `read` gives
    each checkpoint's plain data (LoRA checkpoints: merged first)."""
    if not paths:
        raise ConfigError("no checkpoints to average")
    ckpts = [read(path) for path in paths]
    last = ckpts[-1]
    for path, ckpt in zip(paths, ckpts, strict=True):
        for key in ("tokenizers", "config"):
            mine, theirs = ckpt["hyper_parameters"][key], last["hyper_parameters"][key]
            if key == "config":
                mine, theirs = mine["model"], theirs["model"]
            if mine != theirs:
                raise ConfigError(f"{path} and {paths[-1]} are not checkpoints of one model (their "
                                  f"{'fitted tokenizers' if key == 'tokenizers' else 'model configs'} differ); "
                                  "average checkpoints of one run")
    state = {}
    for name, value in last["state_dict"].items():
        if not value.is_floating_point():  # counters and masks: the last checkpoint's
            state[name] = value
            continue
        total = torch.zeros_like(value, dtype=torch.float64)
        for ckpt in ckpts:
            total += ckpt["state_dict"][name].double()
        state[name] = (total / len(ckpts)).to(value.dtype)
    averaged = weights_checkpoint(last, state)
    averaged.setdefault("seq2seq", {})["averaged"] = [str(path) for path in paths]
    return averaged


def weights_checkpoint(ckpt: dict[str, Any], state: dict[str, Any]) -> dict[str, Any]:
    """`ckpt` with the weights `state` and without its optimizer and loop states: it scores, decodes and exports
    but does not resume. Its callback state is empty, not absent, so that Lightning runs the callbacks'
    `on_load_checkpoint` when a trainer loads it; a checkpoint of an EMA run gets `state` in both of the EMA
    callback's slots, which then takes it as its average too."""
    kept = ("hyper_parameters", "pytorch-lightning_version", "epoch", "global_step", "seq2seq", "averaging_state")
    weights = {**{key: ckpt[key] for key in kept if key in ckpt}, "state_dict": state, "callbacks": {}}
    if "averaging_state" in weights:
        weights["current_model_state"] = state
    return weights
