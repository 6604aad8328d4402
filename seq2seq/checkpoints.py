"""Checkpoint files of a run: written atomically, found for resuming, and checked against the run's config."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import OmegaConf

from seq2seq.errors import ConfigError

log = logging.getLogger("seq2seq")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint beside its target and renames it into place: a write cut short (a crash, a full disk,
    a killed job) leaves the previous file whole. Loads with `weights_only=True`: checkpoints hold plain data."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return torch.load(path, map_location=map_location or "cpu", weights_only=True)


# The data module resumes mid-epoch itself (`Seq2SeqDataModule.state_dict`); Lightning cannot see that.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")


def newest_checkpoint(run_dir: Path) -> Path:
    """The most recently written checkpoint of a run (partial writes are never named *.ckpt)."""
    found = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime_ns)
    if not found:
        raise ConfigError(f"`resume={run_dir}`: no checkpoint in {run_dir / 'checkpoints'}")
    return found[-1]


def resume_point(config: dict[str, Any], run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its fitted tokenizers; the config must be the run's, but for `trainer`."""
    if Path(config["resume"]).resolve() != run_dir.resolve():
        raise ConfigError(f"`resume={config['resume']}` must be the run directory ({run_dir}); "
                          "`seq2seq train ... resume=DIR` sets both")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"`resume={config['resume']}`: no run there to resume (it has no config.yaml)")
    stored = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    assert isinstance(stored, dict)
    changed = sorted(k for k in config.keys() | stored.keys()
                     if k not in ("trainer", "resume") and config.get(k) != stored.get(k))
    if changed:
        raise ConfigError(f"resuming {run_dir} with a config that differs in {', '.join(changed)}: pass the run's "
                          "overrides again (only `trainer.*` may change), or start a new run")
    ckpt = newest_checkpoint(run_dir)
    log.info("resuming from %s", ckpt)
    return ckpt, torch.load(ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]["tokenizers"]
