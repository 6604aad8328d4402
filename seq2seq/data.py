"""From a domain's encoded pairs to batches: the Batch, padding, length checks, batching and the data module.

Shapes: B batch, S source length, T target length, F numeric features.

A domain's reader yields raw (source, target) pairs per split and its encoders turn them into ids or values
(`domain.py`); the core adds BOS/EOS, pads, checks lengths and batches. Every example the core rejects is counted
by reason: kept + rejected = rows read, per split.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Sampler

from seq2seq.domain import Encoder, Split, Tokenizer
from seq2seq.errors import ConfigError, DataError
from seq2seq.schema import check, setting

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # tgt_out value at padding; the loss and metrics skip it


@dataclass(frozen=True)
class LoaderSpec:
    """The `loader:` config block."""

    block: ClassVar[str] = "loader"
    batch_size: int = setting(64, "examples per batch (evaluation, and training without max_tokens)", minimum=1)
    max_tokens: int | None = setting(None, "training batches of similar lengths, at most this many padded tokens",
                                     minimum=1)
    num_workers: int = setting(0, "DataLoader worker processes", minimum=0)
    max_src_len: int | None = setting(None, "longer sources are rejected and counted (default: model.max_positions)",
                                      minimum=1)
    max_tgt_len: int | None = setting(None, "longer targets (counting the EOS) are rejected and counted", minimum=1)

    def __post_init__(self) -> None:
        check(self)


@dataclass
class Batch:
    """One padded batch; the only thing the core consumes."""

    src: Tensor  # (B, S) ids or (B, S, F) values
    src_keep: Tensor  # (B, S) True at real positions
    tgt_in: Tensor  # (B, T) BOS y1 .. yn, then padding
    tgt_out: Tensor  # (B, T) y1 .. yn EOS, then IGNORE_INDEX

    @property
    def tgt_keep(self) -> Tensor:
        return self.tgt_out != IGNORE_INDEX  # (B, T)

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device) for t in (self.src, self.src_keep, self.tgt_in, self.tgt_out)))


@dataclass
class Collate:
    """Pads encoded (source, target) pairs into a Batch; a plain object so DataLoader workers can pickle it."""

    src_pad: float
    tgt_pad: int
    bos: int
    eos: int

    @classmethod
    def for_tokenizers(cls, src_tok: Encoder, tgt_tok: Tokenizer) -> Collate:
        return cls(src_tok.pad_value, tgt_tok.pad_id, tgt_tok.bos_id, tgt_tok.eos_id)

    def __call__(self, examples: list[tuple[Tensor, Tensor]]) -> Batch:
        srcs, tgts = zip(*examples, strict=True)
        src = pad_sequence(list(srcs), batch_first=True, padding_value=self.src_pad)  # (B, S[, F])
        lengths = torch.tensor([len(s) for s in srcs])
        src_keep = torch.arange(src.shape[1])[None, :] < lengths[:, None]  # (B, S)
        bos = torch.tensor([self.bos])
        eos = torch.tensor([self.eos])
        tgt_in = pad_sequence([torch.cat([bos, t]) for t in tgts], batch_first=True, padding_value=self.tgt_pad)
        tgt_out = pad_sequence([torch.cat([t, eos]) for t in tgts], batch_first=True, padding_value=IGNORE_INDEX)
        return Batch(src, src_keep, tgt_in, tgt_out)  # tgt_* (B, T)


def encode_split(
    split: Split, src_tok: Encoder, tgt_tok: Tokenizer, max_src: int, max_tgt: int
) -> tuple[list[tuple[Tensor, Tensor]], Counter[str]]:
    """Encode a split, rejecting (and counting) empty or over-long examples."""
    kept, rejected = [], Counter(split.rejected)
    for src_raw, tgt_raw in split.pairs:
        src, tgt = src_tok.encode(src_raw), tgt_tok.encode(tgt_raw)
        if len(src) == 0:
            rejected["empty source"] += 1
        elif len(src) > max_src:
            rejected[f"source longer than {max_src}"] += 1
        elif len(tgt) + 1 > max_tgt:
            rejected[f"target longer than {max_tgt - 1}"] += 1
        else:
            kept.append((src, tgt))
    return kept, rejected


class TrainingBatches(Sampler[list[int]]):
    """The training batches of an epoch, drawn from `seed + epoch` alone, so every process and every resumed run
    draws the same ones.

    With `max_tokens`, batches hold examples of similar lengths, at most `max_tokens` padded tokens each (longest
    × count; lengths sorted with random tie-breaks), in shuffled order; otherwise `batch_size` examples of a
    shuffled order. With `num_replicas` > 1 the batch list is extended by repeating its first batches to a multiple
    of `num_replicas` and rank r takes every r-th batch: all ranks run the same number of steps. On one process
    every example appears exactly once per epoch. `resume(epoch, done)` makes the next pass over that epoch skip
    its first `done` batches (exact resume mid-epoch).
    """

    def __init__(self, lengths: list[int], max_tokens: int | None = None, batch_size: int = 64, seed: int = 0,
                 shuffle: bool = True, num_replicas: int = 1, rank: int = 0) -> None:
        too_long = max(lengths, default=0)
        if max_tokens is not None and too_long > max_tokens:
            raise ConfigError(f"`loader.max_tokens` ({max_tokens}) is below the longest example ({too_long} "
                              "tokens); raise it or cap lengths with `loader.max_src_len` / `loader.max_tgt_len`")
        self.lengths, self.max_tokens, self.batch_size = lengths, max_tokens, batch_size
        self.seed, self.shuffle, self.num_replicas, self.rank = seed, shuffle, num_replicas, rank
        self.epoch, self.skip = 0, (0, 0)  # skip: (epoch, batches to leave out at its start)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> TrainingBatches:
        """Itself: training loops set the epoch on `batch_sampler.sampler` (torch's BatchSampler layout)."""
        return self

    def resume(self, epoch: int, done: int) -> None:
        self.skip = (epoch, done)

    def _by_tokens(self, rng: random.Random) -> list[list[int]]:
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], rng.random()))
        batches: list[list[int]] = [[]]
        longest = 0
        for i in order:
            longest = max(longest, self.lengths[i])
            if batches[-1] and longest * (len(batches[-1]) + 1) > self.max_tokens:  # type: ignore[operator]
                batches.append([])
                longest = self.lengths[i]
            batches[-1].append(i)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        if self.max_tokens is not None:
            batches = self._by_tokens(rng)
        else:
            order = list(range(len(self.lengths)))
            if self.shuffle:
                rng.shuffle(order)
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        batches += batches[: -len(batches) % self.num_replicas]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the batches are drawn at the first `next`, after the loop has set the epoch.
        batches = self.batches()
        if self.skip[0] == self.epoch:
            batches, self.skip = batches[self.skip[1] :], (0, 0)
        yield from batches

    def __len__(self) -> int:
        return len(self.batches())


def shard(n: int, batch_size: int, num_replicas: int = 1, rank: int = 0) -> list[list[int]]:
    """Evaluation batches over examples 0..n-1 in order, dealt out to ranks in turn: the batches are those of one
    process (so are the decoded outputs, to the last bit), nothing is repeated or dropped (so corpus-level metrics
    summed over ranks equal one process's), and every rank gets at least one (batches shrink if need be)."""
    if n < num_replicas:
        raise ConfigError(f"an evaluation split of {n} examples cannot be shared by {num_replicas} processes")
    size = min(batch_size, -(-n // num_replicas))
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)][rank::num_replicas]


class Seq2SeqDataModule(L.LightningDataModule):
    """Encodes and batches the splits a reader read; writes the per-split counts to `report_path`."""

    def __init__(
        self,
        splits: dict[str, Split],
        src_tok: Encoder,
        tgt_tok: Tokenizer,
        loader: LoaderSpec,
        max_positions: int,
        report_path: Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.seed, self._resume = seed, None
        self.splits, self.src_tok, self.tgt_tok, self.loader = splits, src_tok, tgt_tok, loader
        self.max_src = min(loader.max_src_len or max_positions, max_positions)
        self.max_tgt = min(loader.max_tgt_len or max_positions, max_positions)
        self.report_path = report_path
        self.examples: dict[str, list[tuple[Tensor, Tensor]]] = {}
        self.report: dict[str, dict[str, Any]] = {}
        self.collate = Collate.for_tokenizers(src_tok, tgt_tok)

    def setup(self, stage: str | None = None) -> None:
        for name, split in self.splits.items():
            if name in self.examples:
                continue
            kept, rejected = encode_split(split, self.src_tok, self.tgt_tok, self.max_src, self.max_tgt)
            assert len(kept) + sum(rejected.values()) == split.rows_read, f"{name}: counts do not add up"
            if not kept:
                raise DataError(f"the {name} split has no examples: {split.rows_read} read, rejected by reason "
                                f"{dict(rejected) or '(none)'}. Check the data file and its `data.*` options, or "
                                "raise `loader.max_src_len` / `loader.max_tgt_len`")
            self.examples[name] = kept
            self.report[name] = {"rows_read": split.rows_read, "kept": len(kept), "rejected": dict(rejected)}
            if rejected:
                log.warning("%s split: rejected %d of %d rows: %s", name, split.rows_read - len(kept),
                            split.rows_read, dict(rejected))
        if self.report_path is not None and self.trainer is not None and self.trainer.is_global_zero:
            self.report_path.write_text(json.dumps(self.report, indent=2) + "\n")

    def _ranks(self) -> tuple[int, int]:
        return (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)

    def _loader(self, split: str, batches: Sampler[list[int]] | list[list[int]]) -> DataLoader:
        # The loader's own generator: iterating never draws from the global RNG, which dropout uses.
        return DataLoader(self.examples[split], batch_sampler=batches,  # type: ignore[arg-type]
                          num_workers=self.loader.num_workers, collate_fn=self.collate,
                          persistent_workers=self.loader.num_workers > 0, generator=torch.Generator())

    def train_dataloader(self) -> DataLoader:
        examples = self.examples["train"]
        replicas, rank = self._ranks()
        self.sampler = TrainingBatches([max(len(s), len(t) + 1) for s, t in examples], self.loader.max_tokens,
                                       self.loader.batch_size, self.seed, num_replicas=replicas, rank=rank)
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
        loop = self.trainer.fit_loop
        return {"epoch": loop.epoch_progress.current.processed,
                "batches": loop.epoch_loop.batch_progress.current.processed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = (state["epoch"], state["batches"]) if state else None
