"""The Lightning data module: the splits of a prepared dataset as batches, with examples over the length limits left
out and counted, training batches shared over ranks in equal numbers, and the position in an epoch for exact resume.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from seq2seq.data import Collate, LoaderSpec, TrainingBatches, check_token_budget, epoch_position, shard
from seq2seq.errors import DataError
from seq2seq.prepared import Prepared

log = logging.getLogger(__name__)


class Seq2SeqDataModule(L.LightningDataModule):
    """Batches the splits of a prepared dataset. Examples longer than the limits are left out here, from the
    lengths index (so a new `model.max_positions` needs no new preparation), and counted with the rejections of
    preparation in `report_path` (data_report.json): kept + rejected = examples read, per split and file
    (and the file lines they came from)."""

    def __init__(
        self,
        prepared: Prepared,
        collate: Collate,
        loader: LoaderSpec,
        max_positions: int,
        report_path: Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed, self._resume = seed, None
        self.prepared, self.collate, self.loader = prepared, collate, loader
        self.max_src = min(loader.max_src_len or max_positions, max_positions)
        self.max_tgt = min(loader.max_tgt_len or max_positions, max_positions)
        self.report_path = report_path
        self.examples: dict[str, Dataset] = {}
        self.sizes: dict[str, np.ndarray] = {}  # per split: max(source, target + EOS) of each kept example
        self.corpora: list[tuple[int, int, float]] = []
        self.report: dict[str, dict[str, Any]] = {}

    def setup(self, stage: str | None = None) -> None:
        weights = self.prepared.meta["corpus_weights"]
        for name in self.prepared.splits:
            if name in self.examples:
                continue
            split, report = self.prepared.dataset(name), self.prepared.report(name)
            src_len, tgt_len = split.lengths()
            long_src = src_len > self.max_src
            long_tgt = (tgt_len + 1 > self.max_tgt) & ~long_src
            rejected = Counter(report["rejected"])
            rejected.update({f"source longer than {self.max_src}": int(long_src.sum()),
                             f"target longer than {self.max_tgt - 1}": int(long_tgt.sum())})
            rejected = +rejected  # drop zero counts
            keep = np.flatnonzero(~(long_src | long_tgt)).astype(np.int32 if len(split) < 2**31 else np.int64)
            del long_src, long_tgt
            examples: Dataset = split if len(keep) == len(split) else Subset(split, keep)
            if not len(keep):
                raise DataError(f"the {name} split has no examples: {report['examples_read']} read, rejected by reason "
                                f"{dict(rejected) or '(none)'}. Check the data file and its `data.*` options, or "
                                "raise `loader.max_src_len` / `loader.max_tgt_len`")
            if name == "train":  # the corpora's ranges among the kept examples
                self.corpora = [(int(np.searchsorted(keep, a)), int(np.searchsorted(keep, b)), w)
                                for (a, b), w in zip(split.corpus_ranges, weights, strict=True)]
            self.examples[name] = examples
            np.add(tgt_len, 1, out=tgt_len)
            self.sizes[name] = np.maximum(src_len, tgt_len, out=src_len)[keep]
            if name == "train":
                check_token_budget(self.sizes[name], self.loader.max_tokens)
            del src_len, tgt_len
            self.report[name] = {"lines_read": report["lines_read"], "examples_read": report["examples_read"],
                                 "kept": len(keep), "rejected": dict(rejected),
                                 "files": report["files"]}
            assert len(keep) + sum(rejected.values()) == report["examples_read"], f"{name}: counts do not add up"
            if rejected:
                log.warning("%s split: rejected %d of %d examples: %s", name, report["examples_read"] - len(keep),
                            report["examples_read"], dict(rejected))
        if self.report_path is not None and rank_zero_only.rank == 0:
            self.report_path.write_text(json.dumps(self.report, indent=2) + "\n")

    def _ranks(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def _loader(self, split: str, batches: Sampler[list[int]] | list[list[int]]) -> DataLoader:
        # The loader's own generator: iterating never draws from the global RNG, which dropout uses.
        return DataLoader(self.examples[split], batch_sampler=batches,  # type: ignore[arg-type]
                          num_workers=self.loader.num_workers, collate_fn=self.collate,
                          persistent_workers=self.loader.num_workers > 0, generator=torch.Generator())

    def train_dataloader(self) -> DataLoader:
        replicas, rank = self._ranks()
        self.sampler = TrainingBatches(self.sizes["train"], self.loader.max_tokens, self.loader.batch_size,
                                       self.seed, num_replicas=replicas, rank=rank, corpora=self.corpora)
        if self._resume is not None:
            self.sampler.resume(*self._resume)
        return self._loader("train", self.sampler)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shard(len(self.examples["val"]), self.loader.batch_size, *self._ranks()))

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shard(len(self.examples["test"]), self.loader.batch_size, *self._ranks()))

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in its epoch, for exact resume: the epoch and the batches it has trained on."""
        if self.trainer is None:
            return {}
        epoch, batches, _ = epoch_position(self.trainer.fit_loop)
        return {"epoch": epoch, "batches": batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (state["epoch"], state["batches"]) if state else None
