"""What each command does, top to bottom, on a validated config: `train`, `prepare`, `backtest`, `evaluate`,
`predict`, `translate`, `export`, `serve`.

Training: reader -> prepared dataset (found, or prepared with encoders fitted, or loaded when resuming) -> module ->
data module -> fit -> best checkpoint -> evaluation of the held-out splits -> the domain's report -> metrics.json.
Everything a run writes goes under its run directory: config.yaml, prepared/ (unless `prepared=` names a dataset),
checkpoints/, logs/, metrics.json, data_report.json, plots/. `prepare` writes the prepared dataset alone. The other
commands need nothing but a checkpoint and write only what they are asked to. `backtest` runs `train` once per
fold, into fold-<k>/ under its own run directory.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from omegaconf import OmegaConf
from torch import Tensor

from seq2seq.budget import BudgetPlanner
from seq2seq.checkpoints import (
    AtomicCheckpointIO,
    InterruptCheckpoint,
    average_checkpoints,
    is_checkpoint,
    read_checkpoint,
    refuse_reuse,
    resume_point,
    weights_checkpoint,
)
from seq2seq.config import (
    AverageConfig,
    BacktestConfig,
    EvaluateConfig,
    ExportConfig,
    InferenceConfig,
    PredictConfig,
    PrepareConfig,
    ServeConfig,
    TrainConfig,
    TrainerSpec,
    TranslateConfig,
    resolve_precision,
)
from seq2seq.data import Collate
from seq2seq.datamodule import Seq2SeqDataModule
from seq2seq.domain import Reader
from seq2seq.errors import ConfigError, DataError
from seq2seq.export import is_export, require
from seq2seq.exporting import export as export_model
from seq2seq.guides import Term, matching_terms, read_glossary, term_usage
from seq2seq.metrics import signatures
from seq2seq.module import Seq2SeqModule
from seq2seq.outputs import (
    atomic_write,
    check_file,
    check_folder,
    is_our_text,
    json_sidecar,
    read_json,
    refuse_inputs,
    write_text,
)
from seq2seq.prepared import Prepared, obtain, prepare_dataset
from seq2seq.references import read_pairs, score_files
from seq2seq.registry import DATASETS, METRICS
from seq2seq.schema import to_data
from seq2seq.translate import Translator

log = logging.getLogger("seq2seq")
# Lightning advertises its cloud services on every Trainer it builds; this project's runs have no use for them.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: not str(record.msg).startswith("💡 Tip:"))


class ProgressLog(L.Callback):
    """Progress as log lines, every `log_every_n_steps` steps, where no terminal shows a progress bar."""

    def __init__(self) -> None:
        self.started = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step % trainer.log_every_n_steps or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("train/loss")
        total = f"/{trainer.max_steps}" if trainer.max_steps > 0 else ""
        log.info("step %d%s, epoch %d, train/loss %s, %.0f s", step, total, trainer.current_epoch,
                 "-" if loss is None else f"{float(loss):.4f}", time.monotonic() - self.started)


class CompileLog(L.Callback):
    """With `model.compile`, a log line whenever a training step compiled graphs: the first steps, and any
    recompilation (a batch shape the compiled graphs do not cover), with the batch's shapes."""

    def __init__(self) -> None:
        self.graphs = 0

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        from torch._dynamo.utils import counters  # imported when compiling only

        graphs = counters["stats"]["unique_graphs"]
        if graphs > self.graphs and trainer.is_global_zero:
            log.info("torch.compile: %d graph(s) compiled at step %d (batch %s source, %s target), %d in all",
                     graphs - self.graphs, trainer.global_step, tuple(batch.src.shape), tuple(batch.tgt_in.shape),
                     graphs)
        self.graphs = graphs


class EMAWeights(EMAWeightAveraging):
    """Lightning's EMA of the weights: swapped in for validation, and checkpoints hold it as their `state_dict`
    (what evaluate, translate and export load) with the trained weights beside it (what a resumed run trains on).
    Here it is swapped in for testing too, and the end of training leaves the trained weights in the module, so a
    checkpoint written then (last.ckpt) still resumes from them; `use_average` puts the EMA in for good.

    With `warmup` w, update n (from 1) uses the decay min(d, (1 + n) / (w + n)), as TensorFlow's
    ExponentialMovingAverage does given the step (w = 10): with a fixed d the first weights, barely trained, keep a
    share d^n of the average (15% after 950 steps at 0.998; translate_ko_en's test BLEU fell from 20.2 to 5.7)."""

    def __init__(self, decay: float, warmup: int | None = 10, **kwargs: Any) -> None:
        super().__init__(decay=decay, **kwargs)
        if warmup is not None:
            def avg_fn(ema: Tensor, current: Tensor, n: Tensor) -> Tensor:
                d = min(decay, (1 + int(n)) / (warmup + int(n)))
                return ema + (current - ema) * (1 - d)

            self._kwargs["avg_fn"] = avg_fn

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.on_validation_epoch_end(trainer, pl_module)

    def use_average(self, pl_module: L.LightningModule) -> None:
        """The EMA (of the checkpoint last loaded, or of training) into the module's weights."""
        self._copy_average_to_current(pl_module)


def _trainer(spec: TrainerSpec, root: Path, callbacks: list[L.Callback], loggers: list[Logger] | bool) -> L.Trainer:
    options = to_data(spec)
    options["precision"], why = resolve_precision(spec)
    if rank_zero_only.rank == 0:
        log.info("precision %s (%s)", options["precision"], why)
    if spec.enable_progress_bar is None:
        options["enable_progress_bar"] = sys.stderr.isatty()
    if not options["enable_progress_bar"]:
        callbacks = [*callbacks, ProgressLog()]
    # The data module shards batches over ranks itself (equal step counts for training; nothing repeated for
    # evaluation), so Lightning must not wrap its samplers.
    return L.Trainer(**options, default_root_dir=root, callbacks=callbacks, logger=loggers,
                     plugins=[AtomicCheckpointIO()], use_distributed_sampler=False)


def _fit_trainer(config: TrainConfig, run_dir: Path) -> L.Trainer:
    monitor = config.monitor
    # A resumed run logs beside the first part of its logs, not over them.
    version = f"resumed-{time.strftime('%Y%m%d-%H%M%S')}" if config.resume else ""
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs", version=version)]
    if "tensorboard" in config.loggers:
        loggers.append(TensorBoardLogger(run_dir, name="tensorboard", version=version))
    checkpoints = run_dir / "checkpoints"
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
    return _trainer(trainer, run_dir, callbacks, loggers)


def _datamodule(config: TrainConfig, module: Seq2SeqModule, prepared: Prepared, report: Path | None,
                batch_size: int | None = None) -> Seq2SeqDataModule:
    loader = dataclasses.replace(config.loader, batch_size=batch_size or config.loader.batch_size)
    return Seq2SeqDataModule(prepared, Collate.for_tokenizers(module.src_tok, module.tgt_tok), loader,
                             config.model.max_positions, report_path=report, seed=config.seed)


def _remedy(dest: Path) -> str:
    """How to re-prepare `dest`: the command line of this run, as `seq2seq prepare`."""
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else ["..."]
    given = [o.lstrip("+") for o in overrides]  # as typed: the command line adds `++` inside plugin blocks
    kept = [o for o in given if not o.startswith(("trainer", "resume=", "prepared=", "hydra."))]
    return (f"Prepare it again with `seq2seq prepare {' '.join(kept)} prepared={dest}`, or give the options it was "
            "prepared with")


def prepare(config: PrepareConfig) -> Prepared:
    """Read, fit the tokenizers and encode a training config's data into `config.prepared` (nothing to do when it
    holds that already)."""
    if config.prepared is None:
        raise ConfigError("say where the prepared dataset goes: `prepared=DIR` (with an `experiment=`, the default "
                          "is prepared/<experiment>)")
    reader: Reader = DATASETS.build(config.data, "data")
    return obtain(config, reader, Path(config.prepared), workers=config.workers, shard_size=config.shard_size)


def _write_metrics(trainer: L.Trainer, path: Path, results: dict[str, Any]) -> None:
    if trainer.is_global_zero:
        write_text(path, json.dumps(results, indent=2) + "\n")
        log.info("metrics: %s", json.dumps(results))


def train(config: TrainConfig, run_dir: Path) -> Seq2SeqModule:
    """Fit (or resume, with `config.resume`), then score the best checkpoint on every held-out split; returns the
    module with the best weights, in eval mode."""
    ckpt, tokenizers = resume_point(to_data(config), run_dir) if config.resume else (None, None)
    if rank_zero_only.rank == 0:  # re-launched ranks share the run dir and its one config.yaml
        if not config.resume:
            refuse_reuse(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(to_data(config)), run_dir / "config.yaml")
    L.seed_everything(config.seed, workers=True)
    reader: Reader = DATASETS.build(config.data, "data")
    if config.prepared:
        dest = Path(config.prepared)
        prepared = obtain(config, reader, dest, tokenizers, strict=True, remedy=_remedy(dest))
    else:  # prepared on the fly, into the run's own cache (reused on resume)
        prepared = obtain(config, reader, run_dir / "prepared", tokenizers)
    module = Seq2SeqModule(config, prepared.tokenizers)
    module.prepared = {"fingerprint": prepared.fingerprint, "tokenizers": prepared.meta["tokenizers_digest"],
                       "path": str(prepared.path)}
    splits = prepared.splits
    datamodule = _datamodule(config, module, prepared, run_dir / "data_report.json")
    datamodule.setup("fit")  # what the data and the loader settings refuse, before training starts
    trainer = _fit_trainer(config, run_dir)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    best, results = _held_out_scores(config, trainer, module, datamodule, run_dir, splits)
    results.update(_signatures(module))
    module.eval()
    if trainer.is_global_zero:  # a domain's own scores, baselines and plots, computed once
        results.update(reader.report(Translator(module, config.loader.batch_size), run_dir))
    _write_metrics(trainer, run_dir / "metrics.json", {**results, "best_checkpoint": best})
    return module


def _signatures(module: Seq2SeqModule) -> dict[str, dict[str, str]]:
    """{"signatures": {metric: how it was computed}} for the metrics that say (`metrics.Signed`), or nothing."""
    found = signatures(dict(module.metrics["test"].items(keep_base=True)))
    return {"signatures": found} if found else {}


def _held_out_scores(config: TrainConfig, trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule,
                     run_dir: Path, splits: list[str]) -> tuple[str, dict[str, Any]]:
    """After fitting: the weights to keep and their scores on every held-out split; the module is left holding them.

    The best checkpoint, or what validates better on `monitor.metric` (a tie keeps the best checkpoint): the
    average of the last validations (`average_last`), and with EMA the trained weights beside the best checkpoint's
    EMA. Every candidate is tested too, for the record (`candidates` in metrics.json)."""
    best, results = _best_checkpoint(config, trainer, module, datamodule, run_dir) if "val" in splits else ("", {})
    if "val" in splits and not results:
        results = _scores(trainer.validate(module, datamodule=datamodule, ckpt_path=best or None, verbose=False))
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
            candidates[path].update(_scores(  # which the module keeps when tested last
                trainer.test(module, datamodule=datamodule, ckpt_path=path, verbose=False)))
        results.update(_scores(trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)))
    if len(candidates) > 1:
        candidates[best] = dict(results)
        results["candidates"] = {Path(path).name: scores for path, scores in candidates.items()}
    for ema in emas:
        ema.use_average(module)  # what was scored last
    return best, results


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
    refuse_reuse(run_dir)
    plans = fold_years(span, config.data, config.folds, config.block_years, config.val_years)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(to_data(config)), run_dir / "config.yaml")
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


def _scores(runs: list[dict[str, float]]) -> dict[str, float]:
    return dict(runs[0]) if runs else {}  # none when the split is switched off (limit_*_batches=0)


def _best_checkpoint(config: TrainConfig, trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule,
                     run_dir: Path) -> tuple[str, dict[str, float]]:
    """The best checkpoint, the final weights included, and its validation scores when they are known already.

    A run stopped by `max_time` or `max_steps` between two validations is validated once more, and its final
    weights are kept when they score better; weights whose scores are known are not decoded again.
    """
    callback: ModelCheckpoint = trainer.checkpoint_callback  # type: ignore[assignment]
    metric, mode = config.monitor.metric, config.monitor.mode
    if module.validated_at == trainer.global_step:
        current = Path(callback.best_model_path).name == f"best-step{trainer.global_step}.ckpt"
        known = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        return callback.best_model_path, known if current else {}
    scores = _scores(trainer.validate(module, datamodule=datamodule, verbose=False))
    score, best = scores.get(metric), callback.best_model_score
    if score is None or (best is not None and (score <= best if mode == "max" else score >= best)):
        return callback.best_model_path, {}
    path = run_dir / "checkpoints" / f"best-step{trainer.global_step}.ckpt"
    trainer.save_checkpoint(path, weights_only=False)  # a whole checkpoint: a run can resume from it
    previous = "no earlier validation" if best is None else f"the best validation's {float(best):.4f}"
    log.info("the final weights (step %d) score %s=%.4f, better than %s", trainer.global_step, metric, score,
             previous)
    return str(path), scores


def _averaged(config: TrainConfig, trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule,
              run_dir: Path) -> dict[str, dict[str, float]]:
    """The weights of the last `average_last` validations averaged into checkpoints/averaged.ckpt, and their
    validation scores; nothing when fewer than two validations were kept."""
    checkpoints = run_dir / "checkpoints"  # what the `average_last` ModelCheckpoint keeps, by step
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
        average(AverageConfig(ckpts=[str(p) for p in paths], output=str(averaged)))
    trainer.strategy.barrier("averaged")
    return {str(averaged): _scores(trainer.validate(module, datamodule=datamodule, ckpt_path=averaged,
                                                    verbose=False))}


def _trained(trainer: L.Trainer, module: Seq2SeqModule, datamodule: Seq2SeqDataModule, run_dir: Path,
             best: str) -> dict[str, dict[str, float]]:
    """With EMA: the trained weights that the best checkpoint keeps beside its EMA, as checkpoints/trained.ckpt
    (it does not resume), and their validation scores."""
    trained = run_dir / "checkpoints" / "trained.ckpt"
    if trainer.is_global_zero:
        checkpoint = read_checkpoint(best)
        AtomicCheckpointIO().save_checkpoint(weights_checkpoint(checkpoint, checkpoint["current_model_state"]),
                                             trained)
    trainer.strategy.barrier("trained")
    return {str(trained): _scores(trainer.validate(module, datamodule=datamodule, ckpt_path=trained,
                                                   verbose=False))}


def _translator(config: InferenceConfig) -> Translator:
    if config.ensemble:
        exports = [p for p in (config.ckpt, *config.ensemble) if is_export(p)]
        if exports:
            raise ConfigError(f"an ensemble decodes checkpoints with the core's searches; {exports[0]} is an export")
        translator = Translator.ensemble([config.ckpt, *config.ensemble], config.batch_size)
    else:
        translator = Translator.from_checkpoint(config.ckpt, config.batch_size, config.threads)
    return translator.with_decoding(beam=config.beam, length_penalty=config.length_penalty,
                                    max_len_a=config.max_len_a, max_len_b=config.max_len_b)


def _inputs(config: PredictConfig | TranslateConfig, files: list[str | None]) -> list[str]:
    """What `predict` or `translate` reads (its input checked first), which none of its outputs may be."""
    given = [path for path in files if path is not None]
    for path in given[:1]:
        if not Path(path).is_file():
            raise ConfigError(f"`input={path}`: no such file")
    return [*given, config.ckpt, *config.ensemble]


def _checked_file(key: str, path: str | None, inputs: list[str], force: bool) -> Path | None:
    """A file `predict` or `translate` writes (with `<file>.json` beside it), checked before any work."""
    if path is None:
        return None
    for target in (Path(path), json_sidecar(Path(path))):
        refuse_inputs(key, target, inputs)
    return check_file(key, path, is_our_text, force)


@contextmanager
def _output(path: Path | None, translator: Translator, ckpt: str) -> Iterator[TextIO]:
    """A text file to write whole (with `<file>.json` beside it: the model, backend and decoding settings), or
    standard output."""
    if path is None:
        yield sys.stdout
        return
    with atomic_write(path) as f:
        yield f
    write_text(json_sidecar(path), json.dumps({"checkpoint": ckpt, **translator.settings()}, indent=2) + "\n")


def _evaluate_files(config: EvaluateConfig, out_dir: Path | None) -> dict[str, Any]:
    """`evaluate source=... reference=...`: the whole source file decoded and scored against the references."""
    if config.data or config.glossary:
        raise ConfigError("`source=`/`reference=` score two files as they are: drop `data.*` and `glossary`")
    pairs = read_pairs(config.source, config.reference)  # its mistakes before the checkpoint loads
    translator = _translator(config)
    results = {**score_files(translator, pairs), "checkpoint": config.ckpt, "source": config.source,
               "reference": config.reference, **translator.settings()}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return results


def _checked_folder(config: EvaluateConfig) -> Path | None:
    """`evaluate`'s output folder, checked before any work (`seq2seq.outputs`)."""
    if config.output is None:
        return None
    inputs = [config.ckpt, *config.ensemble, *(p for p in (config.source, config.reference) if p)]
    refuse_inputs("output", config.output, inputs)
    return check_folder("output", config.output, _evaluation_files, config.force)


def _evaluation_files(folder: Path) -> set[str]:
    """Everything in `folder` when an evaluation wrote it (its metrics.json names the checkpoint)."""
    metrics = read_json(folder / "metrics.json")
    return {p.name for p in folder.iterdir()} if metrics is not None and "checkpoint" in metrics else set()


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Re-score a checkpoint on the val and test splits of its data, or of the data its reader reads with
    `config.data` options over the checkpoint's, or on a whole source file against its references; metrics go to
    standard output (and `output`/metrics.json)."""
    if (config.source is None) != (config.reference is None):
        raise ConfigError("give both `source=FILE` and `reference=FILE` (a whole file scored line by line), or "
                          "neither (the val and test splits of the checkpoint's data)")
    out_dir = _checked_folder(config)
    if config.source is not None:
        return _evaluate_files(config, out_dir)
    return _evaluate_splits(config, out_dir)


def _evaluate_splits(config: EvaluateConfig, out_dir: Path | None) -> dict[str, Any]:
    """`evaluate`'s val and test splits, through the trainer as in training."""
    if is_export(config.ckpt):
        raise ConfigError(f"`seq2seq evaluate` scores the splits of checkpoints; {config.ckpt} is an exported "
                          "model, whose agreement with its checkpoint is in its seq2seq_export.json (give it "
                          "`source=` and `reference=` files to score)")
    translator = _translator(config)
    glossary = _glossary(translator, config.glossary) if config.glossary else None  # its mistakes before any work
    module = translator.module
    module.decoder = translator.decoder
    first = module.model
    if config.ensemble:  # validation and test score the ensemble: its loss, and its searches
        module.model = translator.backend.model
    data = {**module.config.data, **config.data}
    DATASETS.check(data, (), "data")  # an option of another reader is refused here, naming the accepted ones
    reader: Reader = DATASETS.build(data, "data")
    held_out = tuple(name for name in reader.splits if name in ("val", "test"))
    with tempfile.TemporaryDirectory() as scratch:
        root = out_dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        prepared = prepare_dataset(dataclasses.replace(module.config, data=data), reader, Path(scratch) / "prepared",
                                   module.hparams["tokenizers"], splits=held_out)
        datamodule = _datamodule(module.config, module, prepared, None, config.batch_size)
        trainer = _trainer(config.trainer, root, [], False)
        results: dict[str, Any] = {}
        if "val" in held_out:
            results.update(_scores(trainer.validate(module, datamodule=datamodule, verbose=False)))
        if "test" in held_out:
            results.update(_scores(trainer.test(module, datamodule=datamodule, verbose=False)))
        module.model = first  # the domain's report decodes through the translator; its plots show `ckpt`'s model
        if trainer.is_global_zero:
            results.update(reader.report(translator, root))
            if glossary:
                results.update(_glossary_scores(translator, reader, glossary))
    results.update(_signatures(module))
    results["checkpoint"] = config.ckpt
    if config.ensemble:
        results["ensemble"] = [config.ckpt, *config.ensemble]
    if out_dir is not None:
        _write_metrics(trainer, out_dir / "metrics.json", results)
    if trainer.is_global_zero:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return results


def _glossary(translator: Translator, path: str) -> list[Term]:
    """The glossary file's terms, each target checked against the model's vocabulary."""
    glossary = read_glossary(path)
    translator.check_glossary(glossary)
    return glossary


def _glossary_scores(translator: Translator, reader: Reader, glossary: list[Term]) -> dict[str, float]:
    """The test split decoded without and with the glossary's terms as constraints: the module's metrics on each
    (`test/glossary/<metric>`), and term usage, the share of expected target terms that the outputs contain."""
    pairs = [pair for rows in reader.stream(("test",)) for pair in rows.pairs]
    if not pairs:
        raise ConfigError("`glossary` scores the test split, and this data has none")
    sources = [src for src, _ in pairs]
    module, tok = translator.module, translator.module.tgt_tok
    refs = [tok.encode(tgt).tolist() for _, tgt in pairs]
    terms = matching_terms(sources, glossary)
    guides = translator.guides(len(sources), include=[[t.target for t in found] for found in terms])
    results: dict[str, float] = {"test/glossary/terms": float(sum(map(len, terms)))}
    for prefix, chosen in (("test", None), ("test/glossary", guides)):
        outputs = translator.tokens(sources, chosen)
        for name in module.config.metrics:
            metric = METRICS.build({"name": name}, "metrics", tokenizer=tok)
            metric.update(outputs, refs)
            results[f"{prefix}/{name}"] = float(metric.compute())
        used, expected = term_usage([tok.decode(o) for o in outputs], terms)
        results[f"{prefix}/term_usage"] = used / max(expected, 1)
    log.info("glossary: %d expected target terms in the test split; used %.1f%% without constraints, %.1f%% with",
             results["test/glossary/terms"], 100 * results["test/term_usage"],
             100 * results["test/glossary/term_usage"])
    return results


def _read_prefixes(path: str, n: int) -> list[str]:
    try:
        prefixes = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"prefix file {path}: cannot be read as UTF-8 text ({err})") from None
    if len(prefixes) != n:
        raise DataError(f"prefix file {path} has {len(prefixes)} lines for {n} inputs; give one line per input "
                        "(an empty line for no prefix)")
    return prefixes


def predict(config: PredictConfig) -> None:
    """Decode every source in `config.input` with nothing but the checkpoint, in the domain's output format."""
    output = _checked_file("output", config.output, _inputs(config, [config.input]), config.force)
    translator = _translator(config)
    reader: Reader = DATASETS.build(translator.module.config.data, "data")
    sources = reader.read_inputs(config.input)
    with _output(output, translator, config.ckpt) as out:
        n = reader.write_predictions(translator, sources, out)
    log.info("wrote predictions for %d inputs to %s", n, config.output or "standard output")


def translate(config: TranslateConfig) -> None:
    """Lines from `input` (default: standard input) to `output` (default: standard output)."""
    inputs = _inputs(config, [config.input, config.prefix, config.glossary])
    output = _checked_file("output", config.output, inputs, config.force)
    attention = _checked_file("attention", config.attention, [*inputs, *([config.output] if output else [])],
                              config.force)
    translator = _translator(config)
    reader: Reader = DATASETS.build(translator.module.config.data, "data")
    lines = reader.read_inputs(config.input or "/dev/stdin")
    guides, terms = None, None
    if config.prefix or config.glossary:
        prefixes = _read_prefixes(config.prefix, len(lines)) if config.prefix else None
        terms = matching_terms(lines, _glossary(translator, config.glossary)) if config.glossary else None
        guides = translator.guides(len(lines), prefixes, [[t.target for t in found] for found in terms]
                                   if terms else None)
    if config.n_best == 1:
        outputs = translator.translate(lines, guides)
        text = "".join(f"{out}\n" for out in outputs)
        if terms:
            used, expected = term_usage(outputs, terms)
            log.info("glossary: %d of %d expected target terms used", used, expected)
    else:
        found = translator.n_best(lines, config.n_best, guides)
        text = "".join(f"{i}\t{score:.4f}\t{out}\n" for i, best in enumerate(found, 1) for score, out in best)
    with _output(output, translator, config.ckpt) as out:
        out.write(text)
    if attention is not None:
        if translator.backend.name != "eager":
            raise ConfigError("attention maps come from the eager model: give `ckpt=` a checkpoint, not an export")
        reader.plot_attention(translator, lines[:4], attention)
        write_text(json_sidecar(attention), json.dumps({"checkpoint": config.ckpt, **translator.settings()},
                                                       indent=2) + "\n")


def export(config: ExportConfig) -> None:
    """Write `config.ckpt` as an exported model folder, checked for parity; the manifest goes to standard output."""
    manifest = export_model(config.ckpt, config.format, config.output, config.quantization, config.check,
                            config.check_limit, config.force)
    sys.stdout.write(json.dumps(manifest, indent=2) + "\n")


def average(config: AverageConfig) -> Path:
    """Write the mean of `config.ckpts` (files or glob patterns, in the order given; a pattern's matches sorted)
    to `config.output`."""
    paths: list[Path] = []
    for given in config.ckpts:
        matches = sorted(map(Path, glob.glob(given))) if any(c in given for c in "*?[") else [Path(given)]
        if not matches:
            raise ConfigError(f"`ckpts`: no checkpoint matches {given}")
        paths += matches
    if len(paths) < 2:
        raise ConfigError(f"`ckpts` names {len(paths)} checkpoint(s); averaging needs two or more, e.g. "
                          "'ckpts=[runs/x/checkpoints/step*.ckpt]'")
    refuse_inputs("output", config.output, paths)
    output = check_file("output", config.output, is_checkpoint, config.force)
    AtomicCheckpointIO().save_checkpoint(average_checkpoints(paths), output)
    log.info("averaged %d checkpoints into %s: %s", len(paths), output, ", ".join(map(str, paths)))
    return output


def serve(config: ServeConfig) -> None:
    """Serve `config.ckpt` (a checkpoint or an export) over HTTP until interrupted."""
    require(("fastapi", "uvicorn"), "serve")
    from seq2seq.serve import Limits, run

    limits = Limits(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Limits)})
    run(_translator(config), limits, config.host, config.port,
        read_glossary(config.glossary) if config.glossary else [])  # the server checks it against the model
