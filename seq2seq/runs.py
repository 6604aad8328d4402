"""A run directory, the one home of its layout: claiming a fresh one, refusing to reuse one that holds something
else, the config the run records, its checkpoints, the point a resume starts from, and removing what a run that
stopped on a mistake wrote."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from itertools import count
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from seq2seq.errors import ConfigError, some
from seq2seq.outputs import remove

log = logging.getLogger("seq2seq")

DERIVED = ("averaged.ckpt", "trained.ckpt")  # written from other checkpoints after training, for scoring
HYDRA_WRITES = (".hydra", "cli.log")  # what Hydra puts in a run directory before the run starts
WRITTEN = ("config.yaml", "data_report.json", "cli.log", "logs", "prepared")  # a run's, before its first checkpoint


@dataclass(frozen=True)
class RunDir:
    """`path/config.yaml` (the run's config), `path/checkpoints/` and what else a run writes there."""

    path: Path

    @classmethod
    def claim(cls, root: Path, now: datetime) -> RunDir:
        """Creates a new run directory `root/<date>/<time>`: runs started in the same second (a shell loop, a job
        array on a shared disk) each get their own, the later ones `<time>-2`, `<time>-3`, ... (creating a
        directory is atomic: of two processes claiming one name, one gets it and the other tries the next)."""
        path = base = root / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
        for n in count(2):
            try:
                path.mkdir(parents=True)
                break
            except FileExistsError:
                path = base.with_name(f"{base.name}-{n}")
        return cls(path)

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def refuse_reuse(self) -> None:
        """A new run must not write into a directory that holds a run (it would mix or overwrite the two), nor
        into one that holds anything else (a run removes what it wrote when it fails: a user's `prepared/` would
        go too)."""
        if self.config.is_file():
            raise ConfigError(f"{self.path} already holds a run. Continue it with `resume={self.path}`, or start a "
                              "new one in another directory (`hydra.run.dir=...`, or leave it out for a fresh "
                              "runs/<date>/<time>)")
        found = sorted(p.name for p in self.path.iterdir() if p.name not in HYDRA_WRITES) \
            if self.path.is_dir() else []
        if found:
            raise ConfigError(f"`hydra.run.dir={self.path}` holds files that are not a run's ({some(found, 5)}); a "
                              "new run needs a new or empty directory (leave `hydra.run.dir` out for a fresh "
                              "runs/<date>/<time>)")

    def write_config(self, data: dict[str, Any]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(data), self.config)

    def read_config(self) -> dict[str, Any]:
        stored = OmegaConf.to_container(OmegaConf.load(self.config))
        assert isinstance(stored, dict)
        return stored

    def newest_checkpoint(self) -> Path:
        """The most recently written checkpoint that training wrote (partial writes are never named *.ckpt)."""
        found = sorted((p for p in self.checkpoints.glob("*.ckpt") if p.name not in DERIVED),
                       key=lambda p: p.stat().st_mtime_ns)
        if not found:
            raise ConfigError(f"`resume={self.path}`: no checkpoint in {self.checkpoints}")
        return found[-1]

    def resume_point(self, config: dict[str, Any]) -> Path:
        """The checkpoint to resume from; `config` (plain data) must be the run's, but for `trainer`. Writes cut
        short by the interruption (`*.partial`) are removed."""
        if Path(config["resume"]).resolve() != self.path.resolve():
            raise ConfigError(f"`resume={config['resume']}` must be the run directory ({self.path}); "
                              "`seq2seq train ... resume=DIR` sets both")
        if not self.config.is_file():
            raise ConfigError(f"`resume={config['resume']}`: no run there to resume (it has no config.yaml)")
        stored = self.read_config()
        if (self.path / "plan.json").is_file() and config["optim"].get("total_steps") is None:
            stored["optim"]["total_steps"] = None  # the run planned it (`seq2seq.budget`); its checkpoints hold it
        changed = sorted(k for k in config.keys() | stored.keys()
                         if k not in ("trainer", "resume", "force") and config.get(k) != stored.get(k))
        if changed:
            raise ConfigError(f"resuming {self.path} with a config that differs in {', '.join(changed)}: pass the "
                              "run's overrides again (only `trainer.*` may change), or start a new run")
        for partial in self.checkpoints.glob("*.partial"):
            log.info("removing %s, a checkpoint write the interruption cut short", partial)
            remove(partial)
        for aside in self.checkpoints.glob("*.ckpt.old-*"):  # a sharded save stopped between its two renames
            target = aside.with_name(aside.name.rsplit(".old-", 1)[0])
            if target.exists():
                remove(aside)
            else:
                log.info("restoring %s, the checkpoint a sharded save had moved aside", target)
                aside.rename(target)
        ckpt = self.newest_checkpoint()
        log.info("resuming from %s", ckpt)
        return ckpt

    def remove_failed(self) -> None:
        """A run that stopped on a mistake before its first checkpoint leaves nothing behind: what it wrote goes,
        then its directory and the empty parents below the working directory (runs/<date>/)."""
        if self.checkpoints.exists():
            return
        for name in WRITTEN:
            remove(self.path / name)
        self.remove_if_empty()

    def remove_if_empty(self) -> None:
        """Removes the directory and its parents below the working directory while they are empty."""
        cwd = Path.cwd().resolve()
        for folder in [self.path.resolve(), *self.path.resolve().parents]:
            if folder == cwd or cwd not in folder.parents or not folder.is_dir() or any(folder.iterdir()):
                return
            folder.rmdir()
