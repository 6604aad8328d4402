"""The command line: `seq2seq train | evaluate | predict [hydra overrides]`.

Hydra composes the config from `conf/`; each command validates it into plain data first, then works only with that.
Everything a run writes goes under Hydra's run directory: config.yaml, checkpoints/, logs/, metrics.json,
data_report.json (and predictions for `predict`).
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from seq2seq.checkpoints import AtomicCheckpointIO, resume_point
from seq2seq.config import prepare_overrides, validate
from seq2seq.data import LoaderSpec, Seq2SeqDataModule, Split
from seq2seq.errors import ConfigError, DataError
from seq2seq.module import Seq2SeqModule, fit_tokenizers
from seq2seq.plugins import listing, searchpath_override
from seq2seq.registry import DATASETS
from seq2seq.translate import Translator

log = logging.getLogger("seq2seq")


def _trainer(config: dict[str, Any], run_dir: Path, fit: bool) -> L.Trainer:
    monitor = config["monitor"]
    # A resumed run logs beside the first part of its logs, not over them.
    version = f"resumed-{time.strftime('%Y%m%d-%H%M%S')}" if config["resume"] else ""
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs", version=version)]
    if "tensorboard" in config["loggers"]:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=version))
    callbacks: list[L.Callback] = []
    if fit:
        callbacks += [
            ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best-step{step}", monitor=monitor["metric"],
                            mode=monitor["mode"], save_top_k=1, save_last=True, auto_insert_metric_name=False),
            # last.ckpt every N steps too, for resuming after a crash; on Ctrl-C or an error, interrupted.ckpt
            ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False,
                            every_n_train_steps=config["save_every_n_steps"]),
            OnExceptionCheckpoint(run_dir / "checkpoints", filename="interrupted"),
            LearningRateMonitor(logging_interval="step"),
        ]
        if monitor["patience"] is not None:
            callbacks.append(EarlyStopping(monitor=monitor["metric"], mode=monitor["mode"],
                                           patience=monitor["patience"]))
    # The data module shards batches over ranks itself (equal step counts for training; nothing repeated for
    # evaluation), so Lightning must not wrap its samplers.
    return L.Trainer(**config["trainer"], default_root_dir=run_dir, callbacks=callbacks, logger=loggers,
                     plugins=[AtomicCheckpointIO()], use_distributed_sampler=False)


def _datamodule(config: dict[str, Any], module: Seq2SeqModule, splits: dict[str, Split],
                run_dir: Path) -> Seq2SeqDataModule:
    return Seq2SeqDataModule(splits, module.src_tok, module.tgt_tok, LoaderSpec(**config["loader"]),
                             module.model.spec.max_positions, report_path=run_dir / "data_report.json",
                             seed=config["seed"])


def _write_metrics(trainer: L.Trainer, run_dir: Path, results: dict[str, Any]) -> None:
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        log.info("metrics: %s", json.dumps(results))


def train(config: dict[str, Any], run_dir: Path) -> Seq2SeqModule:
    """Fit (or resume, with `config["resume"]`), then score the best checkpoint on every held-out split; returns
    the module with the best weights."""
    ckpt, tokenizers = resume_point(config, run_dir) if config["resume"] else (None, None)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # re-launched ranks share the run dir and its one config.yaml
        OmegaConf.save(OmegaConf.create(config), run_dir / "config.yaml")
    L.seed_everything(config["seed"], workers=True)
    reader = DATASETS.build(config["data"], "data")
    splits = {name: reader.read(name) for name in reader.splits}
    module = Seq2SeqModule(config, tokenizers or fit_tokenizers(config, splits["train"].pairs))
    datamodule = _datamodule(config, module, splits, run_dir)
    trainer = _trainer(config, run_dir, fit=True)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    best = _final_candidate(config, trainer, module, datamodule, run_dir) if "val" in splits else ""
    results: dict[str, Any] = {}
    for stage in ("val", "test"):
        if stage in splits:
            run = trainer.validate if stage == "val" else trainer.test
            for scores in run(module, datamodule=datamodule, ckpt_path=best or None, verbose=False):
                results.update(scores)  # none when the split is switched off (limit_val_batches=0)
    _write_metrics(trainer, run_dir, {**results, **_report(reader, trainer, module, splits, run_dir),
                                      "best_checkpoint": best})
    return module


def _final_candidate(config: dict[str, Any], trainer: L.Trainer, module: Seq2SeqModule,
                     datamodule: Seq2SeqDataModule, run_dir: Path) -> str:
    """The best checkpoint, the final weights included: a run stopped by `max_time` or `max_steps` between two
    validations is validated once more, and its final weights are kept when they score better."""
    callback: ModelCheckpoint = trainer.checkpoint_callback  # type: ignore[assignment]
    if module.validated_at == trainer.global_step:
        return callback.best_model_path
    metric, mode = config["monitor"]["metric"], config["monitor"]["mode"]
    scores = trainer.validate(module, datamodule=datamodule, verbose=False)  # [] with limit_val_batches=0
    score = scores[0].get(metric) if scores else None
    best = callback.best_model_score
    if score is None or (best is not None and (score <= best if mode == "max" else score >= best)):
        return callback.best_model_path
    path = run_dir / "checkpoints" / f"best-step{trainer.global_step}.ckpt"
    trainer.save_checkpoint(path)
    log.info("the final weights (step %d) score %s=%.4f, better than the last validation's", trainer.global_step,
             metric, score)
    return str(path)


def _report(reader: Any, trainer: L.Trainer, module: Seq2SeqModule, splits: dict[str, Split],
            run_dir: Path) -> dict[str, Any]:
    """A domain's own scores, baselines and plots (optional reader hook `report`), computed once, on rank 0."""
    if not hasattr(reader, "report") or not trainer.is_global_zero:
        return {}
    return reader.report(module.eval(), splits, run_dir)


def _load(config: dict[str, Any]) -> Seq2SeqModule:
    if not config["ckpt"]:
        raise ConfigError("this command needs a checkpoint: add `ckpt=PATH/TO/FILE.ckpt`")
    if not Path(config["ckpt"]).is_file():
        raise ConfigError(f"`ckpt={config['ckpt']}`: no such file")
    return Seq2SeqModule.from_checkpoint(config["ckpt"])


def evaluate(config: dict[str, Any], run_dir: Path) -> None:
    """Re-score a checkpoint on the validation and test splits of the data it was trained on."""
    module = _load(config)
    stored = module.config
    reader = DATASETS.build(stored["data"], "data")
    splits = {name: reader.read(name) for name in reader.splits if name != "train"}
    datamodule = _datamodule(stored, module, splits, run_dir)
    trainer = _trainer(config, run_dir, fit=False)
    results: dict[str, Any] = {}
    if "val" in splits:
        results.update(trainer.validate(module, datamodule=datamodule, verbose=False)[0])
    if "test" in splits:
        results.update(trainer.test(module, datamodule=datamodule, verbose=False)[0])
    report = _report(reader, trainer, module, {"train": reader.read("train"), **splits}, run_dir)
    _write_metrics(trainer, run_dir, {**results, **report, "checkpoint": config["ckpt"]})


def predict(config: dict[str, Any], run_dir: Path) -> None:
    """Decode every source in `input=FILE` with nothing but the checkpoint.

    A reader with a `write_predictions` hook writes its own format (e.g. a CSV of label probabilities); otherwise
    each input line gets one output line.
    """
    if not config["input"]:
        raise ConfigError("`seq2seq predict` needs `input=FILE` (one source per line)")
    module = _load(config)
    reader = DATASETS.build(module.config["data"], "data")
    sources = reader.read_inputs(config["input"])
    output = Path(config["output"] or run_dir / "predictions.txt")
    if hasattr(reader, "write_predictions"):
        reader.write_predictions(module.eval(), sources, output)
        log.info("wrote predictions for %d inputs to %s", len(sources), output)
        return
    try:
        outputs = module.predict(sources, module.config["loader"]["batch_size"])
    except DataError as err:
        raise DataError(f"{config['input']}: {err}") from None
    output.write_text("".join(line + "\n" for line in outputs), encoding="utf-8")
    log.info("wrote %d predictions to %s", len(outputs), output)


def translate(config: dict[str, Any], run_dir: Path) -> None:
    """Lines from `input=FILE` (default: standard input) to `output=FILE` (default: standard output)."""
    translator = Translator(_load(config), config["loader"]["batch_size"])
    reader = DATASETS.build(translator.module.config["data"], "data")
    lines = reader.read_inputs(config["input"] or "/dev/stdin")
    results = translator.n_best(lines, config["n_best"], config["beam"], config["length_penalty"])
    if config["n_best"] == 1:
        text = "".join(f"{best[0][1]}\n" for best in results)
    else:
        text = "".join(f"{i}\t{score:.4f}\t{out}\n" for i, best in enumerate(results, 1) for score, out in best)
    if config["output"]:
        Path(config["output"]).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if config["attention"]:
        if not hasattr(reader, "plot_attention"):
            raise ConfigError("`attention=` needs a domain that draws attention maps (the text domain does)")
        reader.plot_attention(translator.module, lines[:4], Path(config["attention"]))


COMMANDS: dict[str, Callable[[dict[str, Any], Path], Any]] = {
    "train": train, "evaluate": evaluate, "predict": predict, "translate": translate,
}


# Strategies whose launcher re-runs the command line once per extra process (Lightning's subprocess launcher).
RELAUNCHING = ("ddp", "fsdp", "deepspeed")


def _check_multirun(config: dict[str, Any]) -> None:
    trainer = config["trainer"]
    strategy = str(trainer["strategy"])
    relaunching = strategy.startswith(RELAUNCHING) and not any(k in strategy for k in ("spawn", "fork", "notebook"))
    if HydraConfig.get().mode == RunMode.MULTIRUN and relaunching and (
            trainer["devices"] not in (1, "1") or trainer["num_nodes"] > 1):
        raise ConfigError(f"`trainer.strategy={trainer['strategy']}` re-launches the command line for each extra "
                          "process, which under multirun (-m) would start the whole sweep again in each of them. "
                          "Sweep with `trainer=ddp_spawn`, or run each job on its own")


def _task(command: Callable[[dict[str, Any], Path], Any], cfg: DictConfig) -> float | None:
    """Run one command on one composed config; `train` returns its best `monitor.metric` (for sweepers)."""
    # Multi-process launchers re-run this command line for the other ranks: put the command back in it.
    if sys.argv[1:2] != [command.__name__]:  # once, though multirun calls this per job
        sys.argv[1:1] = [command.__name__]
    try:
        config = validate(cfg)
        _check_multirun(config)
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        command(config, run_dir)
        if command is train and (run_dir / "metrics.json").is_file():
            return json.loads((run_dir / "metrics.json").read_text()).get(config["monitor"]["metric"])
        return None
    except (ConfigError, DataError) as err:
        print(f"seq2seq: error: {err}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    if sys.argv[1:] == ["plugins"]:
        print(listing())
        return
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: seq2seq {{{'|'.join(COMMANDS)}}} [key=value ...] [hydra options] | seq2seq plugins\n"
              "  e.g. seq2seq train experiment=translate_ko_en model.d_model=512 trainer.max_epochs=20",
              file=sys.stderr)
        sys.exit(2)
    command = COMMANDS[sys.argv.pop(1)]
    try:
        args = prepare_overrides(sys.argv[1:])
        extra = [] if any(a.startswith("hydra.searchpath=") for a in args) else searchpath_override()
        if not any(a.startswith("hydra.run.dir=") for a in args):  # `resume=DIR` continues in that run dir
            extra += [f"hydra.run.dir={a.split('=', 1)[1]}" for a in args if a.startswith("resume=")]
        # Hydra's overrides must stay one block among its flags (`-m`, `--cfg job`): join the user's.
        at = next((i for i, a in enumerate(args) if "=" in a and not a.startswith("-")), 0)
        sys.argv[1:] = [*args[:at], *extra, *args[at:]]
    except ConfigError as err:
        print(f"seq2seq: error: {err}", file=sys.stderr)
        sys.exit(2)
    task = functools.update_wrapper(functools.partial(_task, command), command)
    hydra.main(config_path="pkg://seq2seq_conf", config_name="config", version_base="1.3")(task)()
