"""The training commands, top to bottom: `prepare`, `train` (with the policy that picks the weights a run keeps)
and `backtest`.

Training: reader -> prepared dataset (found, or prepared with encoders fitted, or loaded when resuming) -> module ->
data module -> fit -> the weights to keep -> evaluation of the held-out splits -> the domain's report ->
metrics.json. Everything a run writes goes under its run directory: config.yaml, prepared/ (unless `prepared=` names
a dataset), checkpoints/, logs/, metrics.json, data_report.json, plan.json (a time budget), plots/. `prepare` writes
the prepared dataset alone. `backtest` runs `train` once per fold, into fold-<k>/ under its own run directory.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

from seq2seq.budget import BudgetPlanner
from seq2seq.checkpoints import (
    AtomicCheckpointIO,
    InterruptCheckpoint,
    average_checkpoints,
    read_checkpoint,
    weights_checkpoint,
)
from seq2seq.datamodule import Seq2SeqDataModule
from seq2seq.domain import Reader
from seq2seq.errors import ConfigError
from seq2seq.lora import load_base
from seq2seq.module import Seq2SeqModule
from seq2seq.prepared import Prepared
from seq2seq.preparing import obtain
from seq2seq.registry import DATASETS
from seq2seq.runs import RunDir
from seq2seq.schema import to_data
from seq2seq.schemas import BacktestConfig, PrepareConfig, TrainConfig
from seq2seq.sharding import gathered
from seq2seq.trainer import (
    CompileLog,
    EMAWeights,
    build_trainer,
    datamodule_for,
    first_scores,
    metric_signatures,
    write_metrics,
)
from seq2seq.translate import Translator
from seq2seq.warmstart import from_init

log = logging.getLogger("seq2seq")


def fit_trainer(config: TrainConfig, run_dir: Path) -> L.Trainer:
    monitor = config.monitor
    # A resumed run logs beside the first part of its logs, not over them.
    version = f"resumed-{time.strftime('%Y%m%d-%H%M%S')}" if config.resume else ""
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs", version=version)]
    if "tensorboard" in config.loggers:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=version))
    checkpoints = RunDir(run_dir).checkpoints
    callbacks: list[L.Callback] = [
        # No version counter: a resumed run writes last.ckpt again, never last-v1.ckpt beside it.
        ModelCheckpoint(dirpath=checkpoints, filename="best-step{step}", monitor=monitor.metric, mode=monitor.mode,
                        save_top_k=1, save_last=True, auto_insert_metric_name=False, enable_version_counter=False),
        # last.ckpt every N steps too, for resuming after a crash; on Ctrl-C or an error, interrupted.ckpt
        ModelCheckpoint(dirpath=checkpoints, filename="last", enable_version_counter=False,
                        every_n_train_steps=config.save_every_n_steps),
        InterruptCheckpoint(checkpoints, filename="interrupted"),
        LearningRateMonitor(logging_interval="step"),
    ]
    if config.model.compile:
        callbacks.append(CompileLog())
    if config.optim.ema_decay is not None:  # swapped in for validation; checkpoints hold it as their weights
        # parameters only: the buffers (position tables, loss weights) are constants, which averaging would
        # round in the last bit
        callbacks.append(EMAWeights(config.optim.ema_decay, config.optim.ema_warmup, use_buffers=False))
    if config.average_last:  # the weights of the last N validations, for `_averaged`; whole checkpoints, since
        # Lightning leaves callbacks (the EMA weights) out of weights-only ones
        callbacks.append(ModelCheckpoint(dirpath=checkpoints, filename="step{step}", monitor="step", mode="max",
                                         save_top_k=config.average_last, auto_insert_metric_name=False,
                                         enable_version_counter=False))
    if monitor.patience is not None:  # checked after validations only: training may end mid-epoch
        callbacks.append(EarlyStopping(monitor=monitor.metric, mode=monitor.mode, patience=monitor.patience,
                                       check_on_train_epoch_end=False))
    trainer = config.trainer
    if config.optim.total_steps is not None and trainer.max_steps < 0:  # the schedule's end is the run's
        trainer = dataclasses.replace(trainer, max_steps=config.optim.total_steps)
    elif trainer.max_time is not None and config.optim.total_steps is None:  # steps planned from the pace
        candidates = 1 + (config.optim.ema_decay is not None) + (config.average_last is not None)
        callbacks.append(BudgetPlanner(trainer.max_time, run_dir, candidates))
    return build_trainer(trainer, run_dir, callbacks, loggers)


def _overrides() -> list[str]:
    """The command line's overrides, as typed (none outside a Hydra job)."""
    return [o.lstrip("+") for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def _remedy(dest: Path) -> str:
    """How to re-prepare `dest`: the command line of this run, as `seq2seq prepare`."""
    given = _overrides() or ["..."]  # as typed: the command line adds `++` inside plugin blocks
    kept = [o for o in given if not o.startswith(("trainer", "resume=", "prepared=", "hydra."))]
    return (f"Prepare it again with `seq2seq prepare {' '.join(kept)} prepared={dest}`, or give the options it was "
            "prepared with")


def prepare(config: PrepareConfig) -> Prepared:
    """Read, fit the tokenizers and encode a training config's data into `config.prepared` (nothing to do when it
    holds that already)."""
    if config.prepared is None:
        raise ConfigError("say where the prepared dataset goes: `prepared=DIR` (with an `experiment=`, the default "
                          "is prepared/<experiment>)")
    tokenizers = None
    if config.init:
        config, tokenizers, _ = from_init(config, _overrides())
    reader: Reader = DATASETS.build(config.data, "data")
    return obtain(config, reader, Path(config.prepared), tokenizers, workers=config.workers,
                  shard_size=config.shard_size)


def train(config: TrainConfig, run_dir: Path) -> Seq2SeqModule:
    """Fit (or resume, with `config.resume`), then score the best checkpoint on every held-out split; returns the
    module with the best weights, in eval mode."""
    init_weights, tokenizers = None, None
    if config.init:  # the checkpoint's architecture and tokenizers; its weights unless resuming
        config, tokenizers, init_weights = from_init(config, _overrides())
    run = RunDir(run_dir)
    ckpt = run.resume_point(to_data(config)) if config.resume else None
    if ckpt is not None:  # the tokenizers the run fitted
        tokenizers = read_checkpoint(ckpt)["hyper_parameters"]["tokenizers"]
    if rank_zero_only.rank == 0:  # re-launched ranks share the run dir and its one config.yaml
        if not config.resume:
            run.refuse_reuse()
        run.write_config(to_data(config))
    L.seed_everything(config.seed, workers=True)
    reader: Reader = DATASETS.build(config.data, "data")
    if config.prepared:
        dest = Path(config.prepared)
        prepared = obtain(config, reader, dest, tokenizers, strict=True, remedy=_remedy(dest))
    else:  # prepared on the fly, into the run's own cache (reused on resume)
        prepared = obtain(config, reader, run_dir / "prepared", tokenizers)
    module = Seq2SeqModule(config, prepared.tokenizers)
    if init_weights is not None:
        load_base(module.model, init_weights, str(config.init))
    module.prepared = {"fingerprint": prepared.fingerprint, "tokenizers": prepared.meta["tokenizers_digest"],
                       "path": str(prepared.path)}
    splits = prepared.splits
    datamodule = datamodule_for(config, module, prepared, run_dir / "data_report.json")
    datamodule.setup("fit")  # what the data and the loader settings refuse, before training starts
    trainer = fit_trainer(config, run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    best, results = _held_out_scores(config, trainer, module, datamodule, run_dir, splits)
    results.update(metric_signatures(module))
    module.eval()
    with gathered(module.model):  # (sharded by `trainer=fsdp`: whole on every rank, for rank 0's report)
        if trainer.is_global_zero:  # a domain's own scores, baselines and plots, computed once
            results.update(reader.report(Translator(module, config.loader.batch_size), run_dir))
    write_metrics(trainer, run_dir / "metrics.json", {**results, "best_checkpoint": best})
    return module


def _held_out_scores(config: TrainConfig, trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule,
                     run_dir: Path, splits: list[str]) -> tuple[str, dict[str, Any]]:
    """After fitting: the weights to keep and their scores on every held-out split; the module is left holding them.

    The best checkpoint, or what validates better on `monitor.metric` (a tie keeps the best checkpoint): the
    average of the last validations (`average_last`), and with EMA the trained weights beside the best checkpoint's
    EMA. Every candidate is tested too, for the record (`candidates` in metrics.json)."""
    best, results = _best_checkpoint(config, trainer, module, datamodule, run_dir) if "val" in splits else ("", {})
    if "val" in splits and not results:
        results = first_scores(trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False))
    candidates = {best: dict(results)}
    if config.average_last and "val" in splits:
        candidates.update(_averaged(config, trainer, module, datamodule, run_dir))
    emas = [c for c in trainer.callbacks if isinstance(c, EMAWeights)]
    if emas and best:
        candidates.update(_trained(trainer, module, datamodule, run_dir, best))
    if len(candidates) > 1:
        metric, sign = config.monitor.metric, 1 if config.monitor.mode == "max" else -1
        best = max(candidates, key=lambda path: sign * candidates[path][metric])  # the first of a tie
        log.info("weights kept: %s (%s)", Path(best).name, ", ".join(
            f"{Path(path).name} {metric}={scores[metric]:.4f}" for path, scores in candidates.items()))
        results = dict(candidates[best])
    if "test" in splits:
        for path in [p for p in candidates if p != best]:  # scored for the record, before the chosen weights,
            candidates[path].update(first_scores(  # which the module keeps when tested last
                trainer.test(module, datamodule=datamodule, ckpt_path=path, verbose=False)))
        results.update(first_scores(trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)))
    if len(candidates) > 1:
        candidates[best] = dict(results)
        results["candidates"] = {Path(path).name: scores for path, scores in candidates.items()}
    for ema in emas:
        ema.use_average(module)  # what was scored last
    return best, results


def _best_checkpoint(config: TrainConfig, trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule,
                     run_dir: Path) -> tuple[str, dict[str, float]]:
    """The best checkpoint, the final weights included, and its validation scores when they are known already.

    A run stopped by `max_time` or `max_steps` between two validations is validated once more, and its final
    weights are kept when they score better; weights whose scores are known are not decoded again.
    """
    callback: ModelCheckpoint = trainer.checkpoint_callback  # type: ignore[assignment]
    metric, mode = config.monitor.metric, config.monitor.mode
    step = Path(callback.best_model_path).stem.removeprefix("best-step")
    known = module.validated.get(int(step), {}) if step.isdigit() else {}  # validated in this process
    if trainer.global_step in module.validated:
        return callback.best_model_path, known
    scores = first_scores(trainer.validate(module, datamodule=datamodule, verbose=False))
    score, best = scores.get(metric), callback.best_model_score
    if score is None or (best is not None and (score <= best if mode == "max" else score >= best)):
        return callback.best_model_path, known
    path = RunDir(run_dir).checkpoints / f"best-step{trainer.global_step}.ckpt"
    trainer.save_checkpoint(path, weights_only=False)  # a whole checkpoint: a run can resume from it
    previous = "no earlier validation" if best is None else f"the best validation's {float(best):.4f}"
    log.info("the final weights (step %d) score %s=%.4f, better than %s", trainer.global_step, metric, score,
             previous)
    return str(path), scores


def _averaged(config: TrainConfig, trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule,
              run_dir: Path) -> dict[str, dict[str, float]]:
    """The weights of the last `average_last` validations averaged into checkpoints/averaged.ckpt, and their
    validation scores; nothing when fewer than two validations were kept."""
    checkpoints = RunDir(run_dir).checkpoints  # what the `average_last` ModelCheckpoint keeps, by step
    steps = sorted((int(path.stem.removeprefix("step")), path) for path in checkpoints.glob("step*.ckpt"))
    if not steps or steps[-1][0] < trainer.global_step:  # training ended after the last validation: its final
        final = checkpoints / f"step{trainer.global_step}.ckpt"  # weights (validated since) join in
        trainer.save_checkpoint(final)  # (rank 0 writes; every rank takes part)
        steps.append((trainer.global_step, final))
        if len(steps) > config.average_last and trainer.is_global_zero:
            steps[0][1].unlink()
        steps = steps[-config.average_last :]
    paths = [path for _, path in steps]
    if len(paths) < 2:
        log.info("average_last: %d validation(s), nothing to average", len(paths))
        return {}
    averaged = checkpoints / "averaged.ckpt"
    if trainer.is_global_zero:
        AtomicCheckpointIO().save_checkpoint(average_checkpoints(paths), averaged)
    trainer.strategy.barrier("averaged")
    return {str(averaged): first_scores(trainer.validate(module, datamodule=datamodule, ckpt_path=averaged,
                                                    verbose=False))}


def _trained(trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule, run_dir: Path,
             best: str) -> dict[str, dict[str, float]]:
    """With EMA: the trained weights that the best checkpoint keeps beside its EMA, as checkpoints/trained.ckpt
    (it does not resume), and their validation scores."""
    trained = RunDir(run_dir).checkpoints / "trained.ckpt"
    if trainer.is_global_zero:
        checkpoint = read_checkpoint(best)
        AtomicCheckpointIO().save_checkpoint(weights_checkpoint(checkpoint, checkpoint["current_model_state"]),
                                             trained)
    trainer.strategy.barrier("trained")
    return {str(trained): first_scores(trainer.validate(module, datamodule=datamodule, ckpt_path=trained,
                                                   verbose=False))}


def fold_years(span: tuple[int, int], data: dict[str, Any], folds: int, block_years: int | None,
               val_years: int | None) -> list[dict[str, int]]:
    """The `data.val_from`, `test_from`, `test_to` of each fold of a rolling-origin backtest: consecutive test
    blocks that end with the data's last year, each after `val_years` of validation and the training years."""
    first, last = span
    if "test_from" not in data or "val_from" not in data:
        raise ConfigError("`seq2seq backtest` needs `data.val_from` and `data.test_from`")
    val_years = val_years or data["test_from"] - data["val_from"]
    block = block_years or (last - data["test_from"] + 1) // folds
    if val_years < 1 or block < 1:
        raise ConfigError(f"{folds} folds of the years {data['test_from']}-{last} leave {block} test year(s) each "
                          f"and {val_years} validation year(s): lower `folds`, or set `block_years` / `val_years`")
    cuts = [last + 1 - (folds - k) * block for k in range(folds)]
    if cuts[0] - val_years <= first:
        raise ConfigError(f"the first fold would test from {cuts[0]} and validate from {cuts[0] - val_years}, "
                          f"leaving no training years after {first}: lower `folds` or `block_years`")
    return [{"val_from": cut - val_years, "test_from": cut, "test_to": cut + block} for cut in cuts]


def backtest(config: BacktestConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test one model per fold (`fold_years`), in this process; write backtest.json with every fold's
    scores and the reader's pooled report."""
    reader: Reader = DATASETS.build(config.data, "data")
    span = reader.year_span()
    if span is None:
        raise ConfigError(f"the `{config.data.get('name')}` reader does not split by year, so it cannot be "
                          "backtested")
    if config.prepared or config.resume:
        raise ConfigError("`seq2seq backtest` prepares each fold's data in its own run; drop `prepared=` and "
                          "`resume=`")
    run = RunDir(run_dir)
    run.refuse_reuse()
    plans = fold_years(span, config.data, config.folds, config.block_years, config.val_years)
    run.write_config(to_data(config))
    base = TrainConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(TrainConfig)})
    folds, fold_dirs = [], []
    for k, plan in enumerate(plans, 1):
        log.info("backtest fold %d/%d: train < %d, validate %d-%d, test %d-%d", k, len(plans), plan["val_from"],
                 plan["val_from"], plan["test_from"] - 1, plan["test_from"], plan["test_to"] - 1)
        fold_dir = run_dir / f"fold-{k}"
        train(dataclasses.replace(base, data={**config.data, **plan}), fold_dir)
        metrics = json.loads((fold_dir / "metrics.json").read_text())
        folds.append({"fold": k, **plan, "metrics": metrics})
        fold_dirs.append(fold_dir)
    results = {"folds": folds, "pooled": reader.backtest_report(fold_dirs, run_dir)}
    (run_dir / "backtest.json").write_text(json.dumps(results, indent=2) + "\n")
    log.info("backtest: %s", json.dumps(results["pooled"]))
    return results


