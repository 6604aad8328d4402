"""Seq2SeqModule: the LightningModule that trains and scores the encoder-decoder.

It holds no model code: it assembles the model from the typed config through the registries, computes the
teacher-forced loss, decodes (through the one `Decoder`) for validation metrics and sets up the optimizer. Its
hyperparameters are plain data (the resolved config and the fitted tokenizers' state), so a checkpoint alone
rebuilds it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection

from seq2seq.build import build_model, component_modules, load_tokenizers
from seq2seq.checkpoints import read_checkpoint
from seq2seq.config import load_train_config
from seq2seq.data import IGNORE_INDEX, Batch, epoch_position
from seq2seq.decoding import Decoder
from seq2seq.domain import Tokenizer
from seq2seq.errors import ConfigError, DivergedError, some
from seq2seq.lora import load_base, merge
from seq2seq.model import EncoderDecoder
from seq2seq.plugins import import_recorded, plugin_versions
from seq2seq.registry import METRICS
from seq2seq.schedule import configure
from seq2seq.schema import to_data
from seq2seq.schemas import TrainConfig
from seq2seq.search import strip
from seq2seq.sharding import gather, is_sharded, release, shard

log = logging.getLogger(__name__)


def token_weights(tokenizer: Tokenizer, weights: dict[str, float]) -> Tensor | None:
    """(V,) loss weights from `optim.token_weights` (pieces -> weight; others 1), or None when there are none."""
    if not weights:
        return None
    pieces = tokenizer.pieces(list(range(tokenizer.vocab_size)))
    unknown = sorted(set(weights) - set(pieces))
    if unknown:
        shown = pieces if len(pieces) <= 20 else [*pieces[:20], "..."]
        raise ConfigError(f"`optim.token_weights` names {unknown}, which are not target tokens; they are {shown}")
    return torch.tensor([weights.get(p, 1.0) for p in pieces])


def sequence_loss(model: EncoderDecoder, batch: Batch, label_smoothing: float = 0.0, weight: Tensor | None = None,
                  focal_gamma: float = 0.0) -> Tensor:
    """Teacher-forced loss per real target token: cross-entropy, or with `weight` (V,) the weighted mean
    Σ w_y · loss / Σ w_y, and with `focal_gamma` γ > 0 the focal loss -(1 - p_y)^γ · log p_y (Lin et al. 2017).

    Only real target positions go through the output head and the softmax: padding would be scored and then
    ignored, and with a large vocabulary the head is the largest matmul of the step.
    """
    keep = batch.tgt_keep  # (B, T)
    logits = model(batch.src, batch.src_keep, batch.tgt_in, keep, select=keep).float()  # (N, V), N real tokens
    target = batch.tgt_out[keep]  # (N,)
    if weight is not None:
        weight = weight.to(logits.device)
    if not focal_gamma:
        return F.cross_entropy(logits, target, weight=weight, label_smoothing=label_smoothing)
    log_p = logits.log_softmax(-1).gather(1, target[:, None])[:, 0]  # (N,)
    loss = -((1 - log_p.exp()) ** focal_gamma) * log_p
    if weight is None:
        return loss.mean()
    w = weight[target]
    return (w * loss).sum() / w.sum()


def _rng_snapshot() -> tuple[Any, ...]:
    """The global generators dropout and plugins may draw from, as they are (cheap: taken every training step)."""
    return (torch.get_rng_state(), random.getstate(), np.random.get_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def rng_state(snapshot: tuple[Any, ...] | None = None) -> dict[str, Any]:
    """A snapshot (default: now) as plain data, for checkpoints that load with weights_only=True."""
    torch_state, python, (kind, keys, pos, has_gauss, gauss), cuda = snapshot or _rng_snapshot()
    return {"torch": torch_state, "python": python, "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Seq2SeqModule(L.LightningModule):
    """Trains and scores the encoder-decoder of a `TrainConfig`; inference goes through `Translator`."""

    def __init__(self, config: TrainConfig, tokenizers: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters({"config": to_data(config), "tokenizers": tokenizers})  # plain data
        self.config = config
        self.src_tok, self.tgt_tok = load_tokenizers(config, tokenizers)
        self.model = build_model(config, self.src_tok, self.tgt_tok)
        self.strict_loading = not config.model.lora.rank  # a LoRA checkpoint holds the adapters, not the base
        self.decoder = Decoder.for_tokenizer(config.decode, self.tgt_tok, config.model.max_positions)
        weights = token_weights(self.tgt_tok, config.optim.token_weights)
        self.register_buffer("token_weight", weights, persistent=False)
        self._rng_to_restore: dict[str, Any] | None = None
        self.prepared: dict[str, str] = {}  # the prepared dataset it trains on: fingerprint, tokenizers' digest, path
        self.validated: dict[int, dict[str, float]] = {}  # the scores of each validation inside the run, by step
        self._rng_at_batch_start: tuple[Any, ...] | None = None
        # A split's loss per target token, whatever its batches and however they are dealt to ranks (sums are
        # reduced, not each rank's mean): one process and several, any batch size, give the same.
        self.losses = nn.ModuleDict({stage: MeanMetric() for stage in ("val", "test")})
        self.metrics = nn.ModuleDict({
            stage: MetricCollection(
                {name: METRICS.build({"name": name}, "metrics", tokenizer=self.tgt_tok) for name in config.metrics},
                prefix=f"{stage}/",
            )
            for stage in ("val", "test")
        })

    def forward(self, batch: Batch) -> Tensor:
        return self.model(batch.src, batch.src_keep, batch.tgt_in, batch.tgt_keep)  # (B, T, V)

    def loss(self, batch: Batch) -> Tensor:
        if self.config.decode.one_shot:  # trained as it decodes: every position sees BOS
            batch = Batch(batch.src, batch.src_keep, self.decoder.teacher_input(batch.tgt_out), batch.tgt_out)
        optim = self.config.optim
        return sequence_loss(self.model, batch, optim.label_smoothing, self.token_weight, optim.focal_gamma)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        trainer = self.trainer
        # Only on the steps whose metrics are written or shown: a `log` call costs about a millisecond.
        if trainer.progress_bar_callback is not None or (self.global_step + 1) % trainer.log_every_n_steps == 0:
            B = batch.src.shape[0]
            self.log("train/loss", loss, prog_bar=True, batch_size=B)
            real = batch.src_keep.sum() + batch.tgt_keep.sum()
            self.log("train/padding", 1 - real / (batch.src_keep.numel() + batch.tgt_keep.numel()), batch_size=B)
        world = trainer.world_size
        finite = bool(torch.isfinite(loss.detach()))  # every step: a checkpoint must never hold diverged weights
        if world > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)  # every rank stops together
        if not finite:
            raise DivergedError(
                f"training diverged: the loss is not finite at step {self.global_step + 1} "
                f"({float(loss.detach())} on this process). The checkpoints written before it are intact; lower "
                f"`optim.lr` (now {self.config.optim.lr}), lengthen `optim.warmup_steps` or clip gradients "
                "(`trainer.gradient_clip_val`), and start again")
        if world > 1:
            # DDP averages gradients over ranks. Weighting each rank's per-token mean by its share of the global
            # batch's target tokens makes that average the gradient of the global per-token mean, as on one process.
            tokens = batch.tgt_keep.sum()
            loss = loss * (tokens * world / self.all_gather(tokens).sum())
        return loss

    def configure_model(self) -> None:
        """Under `trainer=fsdp` (the strategy gives a device mesh): the model sharded over the data-parallel ranks
        (`seq2seq.sharding`), its layers compiled first with `model.compile`."""
        if self.device_mesh is None or is_sharded(self.model):
            return
        if self.config.model.compile:
            self.model.compile_layers(hooks_eager=True)
        shard(self.model, self.device_mesh["data_parallel"], str(self.trainer.precision))

    def on_fit_start(self) -> None:
        if self.config.model.compile and not is_sharded(self.model):  # training only: a module loaded to decode
            self.model.compile_layers()  # or score runs eager

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first step after resuming draws what the stopped run would have
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._rng_at_batch_start = _rng_snapshot()

    def _score(self, stage: str, batch: Batch) -> None:
        self.losses[stage].update(self.loss(batch), weight=batch.tgt_keep.sum())
        self.log(f"{stage}/loss", self.losses[stage], prog_bar=True, batch_size=batch.src.shape[0])
        self.decode_into(self.metrics[stage], batch)

    def decode_into(self, metrics: MetricCollection, batch: Batch) -> None:
        """Decode `batch` and score the outputs into `metrics` (nothing to decode for when it is empty)."""
        if not metrics:
            return
        eos = self.tgt_tok.eos_id
        refs = strip(batch.tgt_out.masked_fill(batch.tgt_out == IGNORE_INDEX, eos), eos)
        metrics.update(strip(self.decoder(self.model, batch.src, batch.src_keep), eos), refs)

    def _log_metrics(self, stage: str) -> None:
        if not self.metrics[stage]:
            return
        self.log_dict(self.metrics[stage].compute(), prog_bar=True)
        self.metrics[stage].reset()

    def on_validation_epoch_start(self) -> None:
        if is_sharded(self.model):  # every rank at once; decoding then needs no collective
            gather(self.model)

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._score("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if is_sharded(self.model):
            release(self.model)

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:  # the epoch's scores are in by now
            self.validated[self.global_step] = {k: float(v) for k, v in self.trainer.callback_metrics.items()
                                                if k.startswith("val/")}

    def on_test_epoch_start(self) -> None:
        if is_sharded(self.model):
            gather(self.model)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._score("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        if is_sharded(self.model):
            release(self.model)

    def configure_optimizers(self) -> dict:
        estimated = self.trainer.estimated_stepping_batches  # infinite when only the time bounds the run
        steps = int(estimated) if math.isfinite(estimated) else 2**31 - 1  # until `seq2seq.budget` plans it
        return configure(self.config.optim, self.model, self.model.spec.d_model, steps)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The RNG state the next training step starts from: an interrupted step starts over.
        interrupted = self._trainer is not None and self.trainer.interrupted
        checkpoint["seq2seq"] = {
            "version": metadata.version("seq2seq"),
            "plugins": plugin_versions(component_modules(self.config)),
            "rng": self._rng_of_every_rank(rng_state(self._rng_at_batch_start if interrupted else None)),
            "data": self.prepared,
        }
        if self.config.model.lora.rank:  # the adapters and what trains; the base stays in `init`'s checkpoint
            frozen = {f"model.{name}" for name, p in self.model.named_parameters(remove_duplicate=False)
                      if not p.requires_grad}
            checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k not in frozen}
            checkpoint["seq2seq"]["base"] = self.config.init
        if self._trainer is not None and epoch_position(self.trainer.fit_loop)[2]:
            # Written after training stopped inside an epoch: Lightning's loop state would resume at the next
            # epoch; make it say that epoch is still running (as in checkpoints written during it).
            for counts in checkpoint["loops"]["fit_loop"]["epoch_progress"].values():
                counts["processed"] -= 1
                counts["completed"] -= 1
    def _rng_of_every_rank(self, mine: dict[str, Any]) -> list[dict[str, Any]]:
        """Each rank's generators, by global rank (ranks draw dropout masks of their own batches): every rank
        saves a checkpoint together, and rank 0 writes what they all hold."""
        if self._trainer is None or self.trainer.world_size == 1 or not dist.is_initialized():
            return [mine]
        every: list[Any] = [None] * self.trainer.world_size
        dist.all_gather_object(every, mine)
        return every

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get("seq2seq", {}).get("rng")
        if isinstance(saved, list):  # by rank; a run resumed on another number of ranks cannot repeat its draws
            saved = saved[self.global_rank] if len(saved) == self.trainer.world_size else saved[0]
        self._rng_to_restore = saved

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Seq2SeqModule:
        """Rebuild a module from a checkpoint alone (plain data, loaded with weights_only=True); the modules of the
        components it was built from are imported first."""
        ckpt = read_checkpoint(path, map_location)
        recorded = ckpt.get("seq2seq", {}).get("plugins", {})
        import_recorded(list(recorded), path)
        for name, saved in recorded.items():
            if (now := plugin_versions([name])[name]) != saved:
                log.warning("%s: plugin %s was %s when the checkpoint was written, and is %s now", path, name, saved,
                            now)
        hparams = ckpt["hyper_parameters"]
        module = cls(load_train_config(hparams["config"]), hparams["tokenizers"])
        if module.config.model.lora.rank:
            module.load_adapted(ckpt["state_dict"], path)
            return module.merged().eval()
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()

    def load_adapted(self, adapters: dict[str, Tensor], path: str | Path) -> None:
        """A LoRA checkpoint's weights: the base from its `init` checkpoint, then the adapters over it."""
        base = self.config.init
        try:
            state = read_checkpoint(base)["state_dict"]
        except ConfigError as err:
            raise ConfigError(f"{path} holds LoRA adapters over {base}, which cannot be read ({err}); put the base "
                              "checkpoint back there") from None
        load_base(self.model, {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")},
                  str(base))
        self.load_state_dict(adapters, strict=False)
        expected = {f"model.{k}" for k in self.model.state_dict() if ".parametrizations.weight.0." in k}
        if not expected <= set(adapters):
            raise ConfigError(f"{path} lacks adapters {some(sorted(expected - set(adapters)), 5)}")

    def merged(self) -> Seq2SeqModule:
        """The adapters folded into the weights: an ordinary module, whose config says so."""
        merge(self.model)
        lora = dataclasses.replace(self.config.model.lora, rank=0)
        config = dataclasses.replace(self.config, model=dataclasses.replace(self.config.model, lora=lora))
        self.config, self.model.spec = config, config.model
        self.hparams["config"] = to_data(config)
        self.strict_loading = True
        self.model.requires_grad_(True)
        return self
