"""The command line: `seq2seq train | prepare | backtest | evaluate | predict | translate | export | serve |
average | import [key=value ...]`, `seq2seq <command> --help`, `seq2seq <command> ... --check` (validate only),
`seq2seq plugins`.

Hydra composes `conf/<command>.yaml` with the overrides; `config.validate` turns it into the command's typed config;
`training` and `inference` do the work. A mistake in the config or the data exits with status 2 and one message
saying what to change.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from seq2seq.config import compose, help_text, prepare_overrides, validate
from seq2seq.errors import ConfigError, DataError, ExportError
from seq2seq.launch import global_rank, launch
from seq2seq.plugins import listing, searchpath_override
from seq2seq.runs import RunDir
from seq2seq.schemas import TrainConfig

COMMANDS = ("train", "prepare", "backtest", "evaluate", "predict", "translate", "export", "serve", "average",
            "import")


def _command(name: str) -> Callable[..., Any]:
    """A command's function; the commands' modules (Lightning and the rest) are imported only to run one."""
    if name == "import":
        from seq2seq.importing import import_model

        return import_model
    from seq2seq import inference, training

    return getattr(training if name in ("train", "prepare", "backtest") else inference, name)

# Strategies whose launcher re-runs the command line once per extra process (Lightning's subprocess launcher).
RELAUNCHING = ("ddp", "fsdp", "deepspeed")


def _check_multirun(config: TrainConfig) -> None:
    trainer = config.trainer
    strategy = str(trainer.strategy)
    relaunching = strategy.startswith(RELAUNCHING) and not any(k in strategy for k in ("spawn", "fork", "notebook"))
    if HydraConfig.get().mode == RunMode.MULTIRUN and relaunching and (
            trainer.devices not in (1, "1") or trainer.num_nodes > 1):
        raise ConfigError(f"`trainer.strategy={trainer.strategy}` re-launches the command line for each extra "
                          "process, which under multirun (-m) would start the whole sweep again in each of them. "
                          "Sweep with `trainer=ddp_spawn`, or run each job on its own")


def _fail(err: Exception) -> None:
    print(f"seq2seq: error: {err}", file=sys.stderr)
    sys.exit(2)


def _restore_command(command: str) -> None:
    """Multi-process launchers re-run this command line for the other ranks: put the command back in it."""
    if sys.argv[1:2] != [command]:  # once, though multirun calls the task per job
        sys.argv[1:1] = [command]


def _train_task(cfg: DictConfig) -> float | None:
    """One training job; returns its best `monitor.metric` (what sweepers optimize)."""
    _restore_command("train")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # Only what this job wrote may be removed: never a directory that held files before it (a run to resume),
    # and never from a re-launched rank, whose rank 0 owns the directory.
    owned = global_rank() == 0 and not (run_dir.is_dir() and any(run_dir.iterdir()))
    try:
        config = validate(cfg, "train")
        _check_multirun(config)
        _command("train")(config, run_dir)
    except (ConfigError, DataError, ExportError) as err:
        if owned:
            RunDir(run_dir).remove_failed()
        _fail(err)
    except SystemExit:  # Lightning exits 1 after Ctrl-C; shells expect 130 (128 + SIGINT)
        from seq2seq.checkpoints import InterruptCheckpoint  # imported by the command already

        if InterruptCheckpoint.by_user:
            sys.exit(130)
        raise
    metrics = run_dir / "metrics.json"
    return json.loads(metrics.read_text()).get(config.monitor.metric) if metrics.is_file() else None


def _task(command: str, cfg: DictConfig) -> None:
    _restore_command(command)
    try:
        config = validate(cfg, command)
        if command == "backtest":  # writes a run directory, as `train` does
            _command("backtest")(config, Path(HydraConfig.get().runtime.output_dir))
        else:
            _command(command)(config)
    except (ConfigError, DataError, ExportError) as err:
        _fail(err)


def _check(command: str, overrides: list[str]) -> None:
    """`seq2seq <command> ... --check`: the config validated (and, for train, the launch compared with
    `trainer.*`) without any work; exit status 2 with the problems, else what would run."""
    try:
        config = compose(overrides, command)
    except (ConfigError, DataError) as err:
        _fail(err)
    print(f"seq2seq {command}: the config is valid")
    if command in ("train", "backtest"):
        trainer = config.trainer
        print(f"trainer: strategy {trainer.strategy}, accelerator {trainer.accelerator}, devices {trainer.devices} "
              f"a node on {trainer.num_nodes} node(s)")
        print(f"launch: {launch().describe()}")


def _hydra_argv(command: str, args: list[str]) -> tuple[list[str], RunDir | None]:
    """The overrides checked and prepared for Hydra, with the plugins' config folders and the run directory; and
    the run directory created here for a new run (None when the command line names one, or has none)."""
    args = prepare_overrides(args, command)
    extra = [] if any(a.startswith("hydra.searchpath=") for a in args) else searchpath_override()
    experiment = next((a.split("=", 1)[1] for a in args if a.startswith("experiment=")), None)
    if command in ("train", "prepare") and experiment and not any(a.startswith("prepared=") for a in args):
        default = Path("prepared") / experiment  # where `prepare` writes; `train` uses it when it is there
        if command == "prepare" or (default / "meta.json").is_file():
            extra.append(f"prepared={default}")
    claimed = None
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    # Multirun jobs go to the sweep dir; re-launched ranks join the run their rank 0 started (Lightning names it).
    new_run = command in ("train", "backtest") and "-m" not in args and "--multirun" not in args \
        and global_rank() == 0
    if command == "train" and run_dir is None and resume is not None:  # `resume=DIR` continues in that run dir
        extra.append(f"hydra.run.dir={resume}")
    elif new_run and run_dir is None:
        claimed = RunDir.claim(Path("runs"), datetime.now())
        extra.append(f"hydra.run.dir={claimed.path}")
    elif new_run and command == "train" and resume is None:
        RunDir(Path(run_dir)).refuse_reuse()  # before Hydra starts the job in it
    # Hydra's overrides must stay one block among its flags (`-m`, `--cfg job`): join the user's.
    at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), 0)
    return [*args[:at], *extra, *args[at:]], claimed


def main() -> None:
    args = sys.argv[1:]
    if args == ["plugins"]:
        print(listing())
        return
    if not args or args[0] not in COMMANDS:
        print(f"usage: seq2seq {{{'|'.join(COMMANDS)}}} [key=value ...] [hydra options] | seq2seq <command> --help "
              "| seq2seq <command> ... --check | seq2seq plugins\n"
              "  e.g. seq2seq train experiment=translate_ko_en model.d_model=512",
              file=sys.stderr)
        sys.exit(2)
    command = args[0]
    if "--help" in args[1:] or "-h" in args[1:]:
        print(help_text(command))
        return
    if "--check" in args[1:]:
        _check(command, [a for a in args[1:] if a != "--check"])
        return
    try:
        sys.argv[1:], claimed = _hydra_argv(command, args[1:])  # Hydra reads the overrides alone
    except ConfigError as err:
        _fail(err)
    task = _train_task if command == "train" else functools.partial(_task, command)
    try:
        hydra.main(config_path="pkg://seq2seq_conf", config_name=command, version_base="1.3")(task)()
    finally:  # Hydra stopped before the job wrote anything (a bad override): the claimed directory goes
        if claimed is not None:
            claimed.remove_if_empty()
