"""The Lightning Trainer as the commands build it (precision for the hardware, atomic checkpoint writes, progress
lines where no terminal shows a bar), its callbacks (progress, compile log, EMA weights), the data module of a
module's prepared dataset, and the metrics a command writes."""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import EMAWeightAveraging
from lightning.pytorch.loggers import Logger
from torch import Tensor

from seq2seq.checkpoints import (
    AtomicCheckpointIO,
)
from seq2seq.config import resolve_precision
from seq2seq.data import Collate
from seq2seq.datamodule import Seq2SeqDataModule
from seq2seq.metrics import signatures
from seq2seq.module import Seq2SeqModule
from seq2seq.outputs import (
    write_text,
)
from seq2seq.prepared import Prepared
from seq2seq.schema import to_data
from seq2seq.schemas import TrainConfig, TrainerSpec
from seq2seq.sharding import ShardedStrategy

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


def build_trainer(spec: TrainerSpec, root: Path, callbacks: list[L.Callback], loggers: list[Logger] | bool
                  ) -> L.Trainer:
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
    if spec.strategy == "fsdp":  # FSDP2 through Lightning (`seq2seq.sharding`)
        options["strategy"] = ShardedStrategy()
    return L.Trainer(**options, default_root_dir=root, callbacks=callbacks, logger=loggers,
                     plugins=[AtomicCheckpointIO()], use_distributed_sampler=False)


def datamodule_for(config: TrainConfig, module: Seq2SeqModule, prepared: Prepared, report: Path | None,
                batch_size: int | None = None) -> Seq2SeqDataModule:
    loader = dataclasses.replace(config.loader, batch_size=batch_size or config.loader.batch_size)
    return Seq2SeqDataModule(prepared, Collate.for_tokenizers(module.src_tok, module.tgt_tok), loader,
                             config.model.max_positions, report_path=report, seed=config.seed)


def write_metrics(trainer: L.Trainer, path: Path, results: dict[str, Any]) -> None:
    if trainer.is_global_zero:
        write_text(path, json.dumps(results, indent=2) + "\n")
        log.info("metrics: %s", json.dumps(results))


def metric_signatures(module: Seq2SeqModule) -> dict[str, dict[str, str]]:
    """{"signatures": {metric: how it was computed}} for the metrics that say (`metrics.Signed`), or nothing."""
    found = signatures(dict(module.metrics["test"].items(keep_base=True)))
    return {"signatures": found} if found else {}


def first_scores(runs: list[dict[str, float]]) -> dict[str, float]:
    return dict(runs[0]) if runs else {}  # none when the split is switched off (limit_*_batches=0)


