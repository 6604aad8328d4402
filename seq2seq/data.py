"""The data contract between domains and the core: readers, tokenizers, the Batch, and the data module.

Shapes: B batch, S source length, T target length, F numeric features.

A domain's *reader* yields raw (source, target) pairs per split; its *tokenizers* turn a raw source into ids (S,)
or values (S, F) and a raw target into ids (T,). The core adds BOS/EOS, pads, checks lengths and batches.
Every example the core rejects is counted by reason: kept + rejected = rows read, per split.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Sampler

from seq2seq.errors import ConfigError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # tgt_out value at padding; the loss and metrics skip it


class Tokenizer(Protocol):
    """Turns raw items into tensors and back; fitted on the training split, saved inside checkpoints."""

    pad_id: int
    bos_id: int
    eos_id: int
    vocab_size: int

    def fit(self, items: list[Any]) -> None: ...
    def encode(self, item: Any) -> Tensor: ...  # (L,) ids or (L, F) values, no BOS/EOS
    def decode(self, ids: list[int]) -> str: ...
    def state_dict(self) -> dict[str, Any]: ...  # plain data only (checkpoints load with weights_only=True)
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Split:
    """What a reader read for one split: the kept raw pairs, how many rows it read, and its rejections."""

    pairs: list[tuple[Any, Any]]
    rows_read: int
    rejected: Counter[str] = field(default_factory=Counter)


class Reader(Protocol):
    """A domain's data source; registered in `DATASETS` and configured by the `data:` block.

    Optional hooks: `report(module, splits, run_dir) -> dict` adds domain scores, baselines and plots to
    metrics.json after training and evaluation; `write_predictions(module, sources, path)` gives `seq2seq predict`
    a domain output format.
    """

    splits: tuple[str, ...]  # e.g. ("train", "val", "test")

    def read(self, split: str) -> Split: ...
    def read_inputs(self, path: str) -> list[Any]: ...  # raw sources for `seq2seq predict`


def read_lines(path: str | Path) -> tuple[list[str], list[int]]:
    """Lines of a UTF-8 text file split on newlines only (not on U+2028 and kin, as `str.splitlines` would), and
    the 1-based numbers of blank or undecodable lines, for the caller to report."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]
    return lines, [i for i, line in enumerate(lines, 1) if not line.strip() or "\ufffd" in line]


@dataclass
class LoaderSpec:
    """The `loader:` config block."""

    batch_size: int = 64  # examples per batch (evaluation, and training without max_tokens)
    max_tokens: int | None = None  # training batches of similar lengths, at most this many padded tokens
    num_workers: int = 0
    max_src_len: int | None = None  # longer sources are rejected and counted (default: model.max_positions)
    max_tgt_len: int | None = None  # same for targets, counting the EOS


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
    def for_tokenizers(cls, src_tok: Tokenizer, tgt_tok: Tokenizer) -> Collate:
        src_pad = getattr(src_tok, "pad_id", None)  # value "tokenizers" (numeric sources) have none
        return cls(0.0 if src_pad is None else float(src_pad), tgt_tok.pad_id, tgt_tok.bos_id, tgt_tok.eos_id)

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
    split: Split, src_tok: Tokenizer, tgt_tok: Tokenizer, max_src: int, max_tgt: int
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


class TokenBudgetSampler(Sampler[list[int]]):
    """Batches of similar-length examples, each at most `max_tokens` padded tokens (longest × count).

    Lengths are sorted with random tie-breaks and the batch order is shuffled, both from `seed + epoch`, so every
    process draws the same batches. With `num_replicas` > 1 the batch list is extended by repeating its first
    batches to a multiple of `num_replicas` and rank r takes every r-th batch: all ranks run the same number of
    steps. On one process every example appears exactly once per epoch.
    """

    def __init__(self, lengths: list[int], max_tokens: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0) -> None:
        too_long = max(lengths, default=0)
        if too_long > max_tokens:
            raise ConfigError(f"`loader.max_tokens` ({max_tokens}) is below the longest example ({too_long} "
                              "tokens); raise it or cap lengths with `loader.max_src_len` / `loader.max_tgt_len`")
        self.lengths, self.max_tokens, self.seed, self.shuffle = lengths, max_tokens, seed, shuffle
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed + self.epoch)
        order = sorted(range(len(self.lengths)), key=lambda i: (self.lengths[i], rng.random()))
        batches: list[list[int]] = [[]]
        longest = 0
        for i in order:
            longest = max(longest, self.lengths[i])
            if batches[-1] and longest * (len(batches[-1]) + 1) > self.max_tokens:
                batches.append([])
                longest = self.lengths[i]
            batches[-1].append(i)
        if self.shuffle:
            rng.shuffle(batches)
        short = -len(batches) % self.num_replicas
        batches += batches[:short]
        return batches[self.rank :: self.num_replicas]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class Seq2SeqDataModule(L.LightningDataModule):
    """Encodes and batches the splits a reader read; writes the per-split counts to `report_path`."""

    def __init__(
        self,
        splits: dict[str, Split],
        src_tok: Tokenizer,
        tgt_tok: Tokenizer,
        loader: LoaderSpec,
        max_positions: int,
        report_path: Path | None = None,
    ) -> None:
        super().__init__()
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
            self.examples[name] = kept
            self.report[name] = {"rows_read": split.rows_read, "kept": len(kept), "rejected": dict(rejected)}
            if rejected:
                log.warning("%s split: rejected %d of %d rows: %s", name, split.rows_read - len(kept),
                            split.rows_read, dict(rejected))
        if self.report_path is not None and self.trainer is not None and self.trainer.is_global_zero:
            self.report_path.write_text(json.dumps(self.report, indent=2) + "\n")

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.examples[split],  # type: ignore[arg-type]
            batch_size=self.loader.batch_size,
            shuffle=shuffle,
            num_workers=self.loader.num_workers,
            collate_fn=self.collate,
            persistent_workers=self.loader.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if self.loader.max_tokens is None:
            return self._loader("train", shuffle=True)
        examples = self.examples["train"]
        trainer = self.trainer
        sampler = TokenBudgetSampler(
            [max(len(s), len(t) + 1) for s, t in examples], self.loader.max_tokens,
            seed=torch.initial_seed() % 2**31,
            num_replicas=trainer.world_size if trainer else 1, rank=trainer.global_rank if trainer else 0)
        return DataLoader(examples, batch_sampler=sampler, num_workers=self.loader.num_workers,  # type: ignore[arg-type]
                          collate_fn=self.collate, persistent_workers=self.loader.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
