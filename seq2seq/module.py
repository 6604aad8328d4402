"""Seq2SeqModule: the LightningModule that trains and scores the encoder-decoder.

It holds no model code: it assembles the model from plain config through the registries, computes the
teacher-forced loss, decodes for validation metrics and sets up the optimizer. Its hyperparameters are plain data
(the resolved config and the fitted tokenizers' state), so a checkpoint alone rebuilds it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MetricCollection

from seq2seq.data import IGNORE_INDEX, Batch, Collate, Tokenizer
from seq2seq.decoding import (
    DecodeSpec,
    beam_search,
    greedy,
    max_length,
    one_shot,
    one_shot_input,
    sample_from,
    strip,
)
from seq2seq.errors import ConfigError, DataError
from seq2seq.model import EncoderDecoder, ModelSpec
from seq2seq.plugins import import_plugins, plugin_versions
from seq2seq.registry import EMBEDDINGS, HEADS, METRICS, TOKENIZERS
from seq2seq.schedule import OptimSpec, configure

log = logging.getLogger(__name__)


def fit_tokenizers(config: dict[str, Any], train_pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """Build the tokenizers named in config, fit them on the training pairs, return their plain-data state."""
    specs = config["tokenizer"]
    src = TOKENIZERS.build(specs["src"], where="tokenizer.src")
    sources = [s for s, _ in train_pairs]
    if specs["tgt"] is None:  # one joint vocabulary
        src.fit(sources + [t for _, t in train_pairs])
        return {"src": src.state_dict(), "tgt": None}
    tgt = TOKENIZERS.build(specs["tgt"], where="tokenizer.tgt")
    src.fit(sources)
    tgt.fit([t for _, t in train_pairs])
    return {"src": src.state_dict(), "tgt": tgt.state_dict()}


def load_tokenizers(config: dict[str, Any], states: dict[str, Any]) -> tuple[Tokenizer, Tokenizer]:
    specs = config["tokenizer"]
    src = TOKENIZERS.build(specs["src"], where="tokenizer.src")
    src.load_state_dict(states["src"])
    if specs["tgt"] is None:
        return src, src
    tgt = TOKENIZERS.build(specs["tgt"], where="tokenizer.tgt")
    tgt.load_state_dict(states["tgt"])
    return src, tgt


def build_model(config: dict[str, Any], src_tok: Tokenizer, tgt_tok: Tokenizer) -> EncoderDecoder:
    """Assemble embeddings, core and head from config; tie weights as configured."""
    spec = ModelSpec(**config["model"])
    d = spec.d_model
    # Context a numeric source tokenizer has no notion of (vocab_size, padding_idx) is None, and vice versa.
    src_embed = EMBEDDINGS.build(config["embedding"]["src"], "embedding.src", d_model=d,
                                 vocab_size=getattr(src_tok, "vocab_size", None),
                                 padding_idx=getattr(src_tok, "pad_id", None),
                                 n_features=getattr(src_tok, "n_features", None))
    if spec.share_embeddings:
        if src_tok is not tgt_tok:
            raise ConfigError("`model.share_embeddings=true` needs one joint vocabulary: set `tokenizer.tgt` to "
                              "null, or set `model.share_embeddings=false`")
        tgt_embed = src_embed
    else:
        tgt_embed = EMBEDDINGS.build(config["embedding"]["tgt"], "embedding.tgt", d_model=d,
                                     vocab_size=tgt_tok.vocab_size, padding_idx=tgt_tok.pad_id)
    head = HEADS.build(config["head"], "head", d_model=d, vocab_size=tgt_tok.vocab_size)
    if spec.tie_output:
        if not (hasattr(head, "tie") and isinstance(getattr(tgt_embed, "weight", None), nn.Parameter)):
            raise ConfigError("`model.tie_output=true` needs a target embedding with a `weight` table and a head "
                              "with `tie`; set `model.tie_output=false` for these components")
        head.tie(tgt_embed.weight)
    return EncoderDecoder(spec, src_embed, tgt_embed, head)


def sequence_loss(model: EncoderDecoder, batch: Batch, label_smoothing: float = 0.0) -> Tensor:
    """Teacher-forced cross-entropy per real target token.

    Only real target positions go through the output head and the softmax: padding would be scored and then
    ignored, and with a large vocabulary the head is the largest matmul of the step.
    """
    keep = batch.tgt_keep  # (B, T)
    hidden = model.decode(batch.tgt_in, model.encode(batch.src, batch.src_keep), batch.src_keep, keep)  # (B, T, D)
    logits = model.head(hidden[keep])  # (N, V), N real target tokens
    return F.cross_entropy(logits.float(), batch.tgt_out[keep], label_smoothing=label_smoothing)


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
    def __init__(self, config: dict[str, Any], tokenizers: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.config = config
        self.src_tok, self.tgt_tok = load_tokenizers(config, tokenizers)
        self.model = build_model(config, self.src_tok, self.tgt_tok)
        self.optim = OptimSpec(**config["optim"])
        self.decode_spec = DecodeSpec(**config["decode"])
        # A label domain's target tokenizer names its label ids; decoding then emits nothing else.
        self.label_ids: list[int] | None = getattr(self.tgt_tok, "label_ids", None)
        allowed = None
        if self.label_ids is not None:
            allowed = torch.zeros(self.tgt_tok.vocab_size, dtype=torch.bool)  # (V,)
            allowed[self.label_ids] = True
        self.register_buffer("allowed", allowed, persistent=False)
        self._rng_to_restore: dict[str, Any] | None = None
        self.validated_at = -1  # the training step of the last validation
        self._rng_at_batch_start: tuple[Any, ...] | None = None
        self.metrics = nn.ModuleDict({
            stage: MetricCollection(
                {name: METRICS.build({"name": name}, "metrics", tokenizer=self.tgt_tok) for name in config["metrics"]},
                prefix=f"{stage}/",
            )
            for stage in ("val", "test")
        })

    def forward(self, batch: Batch) -> Tensor:
        return self.model(batch.src, batch.src_keep, batch.tgt_in, batch.tgt_keep)  # (B, T, V)

    def loss(self, batch: Batch) -> Tensor:
        if self.decode_spec.one_shot:
            batch = Batch(batch.src, batch.src_keep, one_shot_input(batch.tgt_in, self.tgt_tok.bos_id), batch.tgt_out)
        return sequence_loss(self.model, batch, self.optim.label_smoothing)

    def decode_tokens(self, src: Tensor, src_keep: Tensor) -> Tensor:
        """Decode a source batch as `decode:` says (greedy, beam, sampling or one-shot): tokens (B, L)."""
        spec, tok = self.decode_spec, self.tgt_tok
        max_len = max_length(src_keep, spec.max_len_a, spec.max_len_b)
        if spec.one_shot:
            return one_shot(self.model, src, src_keep, bos=tok.bos_id, length=max_len, allowed=self.allowed)
        if spec.beam > 1 and not spec.sampling:
            return beam_search(self.model, src, src_keep, bos=tok.bos_id, eos=tok.eos_id, max_len=max_len,
                               beam=spec.beam, length_penalty=spec.length_penalty,
                               length_normalization=spec.length_normalization, allowed=self.allowed,
                               no_repeat_ngram=spec.no_repeat_ngram).tokens[:, 0]
        sampler = partial(sample_from, temperature=spec.temperature, top_k=spec.top_k,
                          top_p=spec.top_p) if spec.sampling else None
        return greedy(self.model, src, src_keep, bos=tok.bos_id, eos=tok.eos_id, max_len=max_len,
                      allowed=self.allowed, no_repeat_ngram=spec.no_repeat_ngram, sampler=sampler)

    def generate(self, src: Tensor, src_keep: Tensor) -> list[list[int]]:
        """Decoded token ids per example, cut at EOS."""
        return strip(self.decode_tokens(src, src_keep), self.tgt_tok.eos_id)

    @torch.no_grad()
    def label_probabilities(self, src: Tensor, src_keep: Tensor) -> Tensor:
        """Label domains: (B, L, C) probability of each label (in `label_ids` order) at each decoded position.

        Autoregressive mode conditions position k on the decoded labels before it; one-shot mode on nothing.
        """
        if self.label_ids is None:
            raise ConfigError("label probabilities need a target tokenizer with `label_ids` (a label domain)")
        tokens = self.decode_tokens(src, src_keep)  # (B, L)
        bos = self.tgt_tok.bos_id
        if self.decode_spec.one_shot:
            tgt_in = one_shot_input(tokens, bos)
        else:
            tgt_in = torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)
        logits = self.model(src, src_keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool))  # (B, L, V)
        return logits[..., self.label_ids].float().softmax(-1)

    def source_batches(self, sources: list[Any], batch_size: int) -> Iterator[tuple[list[int], Batch]]:
        """Encode raw sources and batch them by length; yields (input positions, batch) in eval mode."""
        encoded = [self.src_tok.encode(s) for s in sources]
        limit = self.model.spec.max_positions
        bad = [i for i, s in enumerate(encoded, 1) if not 0 < len(s) <= limit]
        if bad:
            raise DataError(f"input(s) {bad[:10]} ({len(bad)} in all, numbered from 1) are empty or longer than "
                            f"the model's {limit} positions; shorten or split them")
        collate = Collate.for_tokenizers(self.src_tok, self.tgt_tok)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                yield idx, collate([(encoded[i], torch.empty(0, dtype=torch.long)) for i in idx]).to(self.device)
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, sources: list[Any], batch_size: int = 64) -> list[str]:
        """Decode raw sources (as the domain's reader yields them) to output strings, in input order.

        Runs in eval mode (dropout off) whatever mode the module is in, and restores that mode afterwards.
        """
        outputs = [""] * len(sources)
        for idx, batch in self.source_batches(sources, batch_size):
            for i, hyp in zip(idx, self.generate(batch.src, batch.src_keep), strict=True):
                outputs[i] = self.tgt_tok.decode(hyp)
        return outputs

    def predict_probabilities(self, sources: list[Any], batch_size: int = 256) -> Tensor:
        """Label domains: (N, L, C) label probabilities per decoded position, in input order (eval mode)."""
        parts: list[tuple[list[int], Tensor]] = [
            (idx, self.label_probabilities(batch.src, batch.src_keep).cpu())
            for idx, batch in self.source_batches(sources, batch_size)
        ]
        out = torch.empty(len(sources), *parts[0][1].shape[1:])
        for idx, probs in parts:
            out[idx] = probs
        return out

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        B = batch.src.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        real = batch.src_keep.sum() + batch.tgt_keep.sum()
        self.log("train/padding", 1 - real / (batch.src_keep.numel() + batch.tgt_keep.numel()), batch_size=B)
        world = self.trainer.world_size
        if world > 1:
            # DDP averages gradients over ranks. Weighting each rank's per-token mean by its share of the global
            # batch's target tokens makes that average the gradient of the global per-token mean, as on one process.
            tokens = batch.tgt_keep.sum()
            loss = loss * (tokens * world / self.all_gather(tokens).sum())
        return loss

    def on_train_batch_start(self, batch: Batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # the first step after resuming draws what the stopped run would have
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        self._rng_at_batch_start = _rng_snapshot()

    def _score(self, stage: str, batch: Batch) -> None:
        self.log(f"{stage}/loss", self.loss(batch), prog_bar=True, sync_dist=True, batch_size=batch.src.shape[0])
        if not self.metrics[stage]:
            return  # nothing to decode for
        eos = self.tgt_tok.eos_id
        refs = strip(batch.tgt_out.masked_fill(batch.tgt_out == IGNORE_INDEX, eos), eos)
        self.metrics[stage].update(self.generate(batch.src, batch.src_keep), refs)

    def _log_metrics(self, stage: str) -> None:
        if not self.metrics[stage]:
            return
        self.log_dict(self.metrics[stage].compute(), prog_bar=True)
        self.metrics[stage].reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._score("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        if not self.trainer.sanity_checking:
            self.validated_at = self.global_step

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._score("test", batch)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def configure_optimizers(self) -> dict:
        return configure(self.optim, self.model, self.model.spec.d_model, int(self.trainer.estimated_stepping_batches))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The RNG state the next training step starts from: an interrupted step starts over.
        interrupted = self._trainer is not None and self.trainer.interrupted
        checkpoint["seq2seq"] = {
            "version": metadata.version("seq2seq"),
            "plugins": plugin_versions(self.config["plugins"]),
            "rng": rng_state(self._rng_at_batch_start if interrupted else None),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._rng_to_restore = checkpoint.get("seq2seq", {}).get("rng")

    @classmethod
    def from_checkpoint(cls, path: str | Path, map_location: str | torch.device = "cpu") -> Seq2SeqModule:
        """Rebuild a module from a checkpoint alone (plain data, loaded with weights_only=True)."""
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
        hparams = ckpt["hyper_parameters"]
        import_plugins(hparams["config"]["plugins"])
        for name, saved in ckpt.get("seq2seq", {}).get("plugins", {}).items():
            if (now := plugin_versions([name])[name]) != saved:
                log.warning("%s: plugin %s was %s when the checkpoint was written, and is %s now", path, name, saved,
                            now)
        module = cls(hparams["config"], hparams["tokenizers"])
        module.load_state_dict(ckpt["state_dict"])
        return module.eval()
