"""From a domain's encoded pairs to batches: the Batch, padding, length checks and batching (the Lightning data module
that serves them from a prepared dataset is `seq2seq.datamodule`).

Shapes: B batch, S source length, T target length, F numeric features.

A domain's reader yields raw (source, target) pairs per split, its encoders turn them into ids or values
(`domain.py`), and `prepared.py` stores them in Arrow shards; here the core checks lengths, adds BOS/EOS,
pads and batches. Every example left out is counted by reason: kept + rejected = examples read, per split.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Sampler

from seq2seq.decoding import teacher_input
from seq2seq.domain import Encoder, Tokenizer
from seq2seq.errors import ConfigError
from seq2seq.schema import check, setting

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
    forced: tuple[int, ...] = ()  # the target tokenizer's `forced_prefix`, in front of every target

    @classmethod
    def for_tokenizers(cls, src_tok: Encoder, tgt_tok: Tokenizer) -> Collate:
        return cls(src_tok.pad_value, tgt_tok.pad_id, tgt_tok.bos_id, tgt_tok.eos_id, tuple(tgt_tok.forced_prefix))

    def __call__(self, examples: list[tuple[Tensor, Tensor]]) -> Batch:
        srcs, tgts = zip(*examples, strict=True)
        src = pad_sequence(list(srcs), batch_first=True, padding_value=self.src_pad)  # (B, S[, F])
        lengths = torch.tensor([len(s) for s in srcs])
        src_keep = torch.arange(src.shape[1])[None, :] < lengths[:, None]  # (B, S)
        forced, eos = torch.tensor(self.forced, dtype=torch.long), torch.tensor([self.eos])
        tgt_out = pad_sequence([torch.cat([forced, t, eos]) for t in tgts], batch_first=True,
                               padding_value=IGNORE_INDEX)  # (B, T)
        # Padding is a suffix: a shifted-in IGNORE_INDEX lands on padding, which the fill covers
        tgt_in = teacher_input(tgt_out, self.bos).masked_fill(tgt_out == IGNORE_INDEX, self.tgt_pad)
        return Batch(src, src_keep, tgt_in, tgt_out)


def check_token_budget(lengths: np.ndarray, max_tokens: int | None) -> None:
    """A ConfigError when an example is longer than a batch may be."""
    too_long = int(lengths.max(initial=0))
    if max_tokens is not None and too_long > max_tokens:
        raise ConfigError(f"`loader.max_tokens` ({max_tokens}) is below the longest example ({too_long} "
                          "tokens); raise it or cap lengths with `loader.max_src_len` / `loader.max_tgt_len`")


class TrainingBatches(Sampler[list[int]]):
    """The training batches of an epoch, drawn from `seed + epoch` alone, so every process and every resumed run
    draws the same ones.

    An epoch's examples are each example once, or, with `corpora` ((start, end, weight) index ranges), as many as
    there are examples in all, drawn from each corpus in proportion to its weight (without repeats while a corpus
    lasts). With `max_tokens`, batches hold examples of similar lengths, at most `max_tokens` padded tokens each
    (longest × count; lengths sorted with random tie-breaks), in shuffled order; otherwise `batch_size` examples of
    a shuffled order. With `num_replicas` > 1 the batch list is extended by repeating its first batches to a
    multiple of `num_replicas` and rank r takes every r-th batch: all ranks run the same number of steps.
    `resume(epoch, done)` makes the next pass over that epoch skip its first `done` batches (exact resume
    mid-epoch). Indices and lengths live in numpy arrays: a few bytes per example.
    """

    def __init__(self, lengths: Sequence[int] | np.ndarray, max_tokens: int | None = None, batch_size: int = 64,
                 seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0,
                 corpora: list[tuple[int, int, float]] | None = None) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int32)
        check_token_budget(self.lengths, max_tokens)
        self.max_tokens, self.batch_size, self.corpora = max_tokens, batch_size, corpora
        self.seed, self.shuffle, self.num_replicas, self.rank = seed, shuffle, num_replicas, rank
        self.epoch, self.skip = 0, (0, 0)  # skip: (epoch, batches to leave out at its start)
        self._drawn: tuple[int, list[np.ndarray]] | None = None
        self._index = np.int32 if len(self.lengths) < 2**31 else np.int64  # 4 bytes an example where they fit

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def sampler(self) -> TrainingBatches:
        """Itself: training loops set the epoch on `batch_sampler.sampler` (torch's BatchSampler layout)."""
        return self

    def resume(self, epoch: int, done: int) -> None:
        self.skip = (epoch, done)

    def _examples(self, rng: np.random.Generator) -> np.ndarray:
        n = len(self.lengths)
        if not self.corpora or len(self.corpora) == 1:
            examples = np.arange(n, dtype=self._index)
            if self.shuffle:
                rng.shuffle(examples)
            return examples
        weights = np.array([w for _, _, w in self.corpora])
        share = n * weights / weights.sum()
        counts = np.floor(share).astype(np.int64)
        counts[np.argsort(counts - share, kind="stable")[: n - counts.sum()]] += 1  # largest remainders
        drawn = []
        for (start, end, _), count in zip(self.corpora, counts, strict=True):
            size = end - start
            if size == 0 or count == 0:
                continue
            laps = [rng.permutation(size) for _ in range(-(-count // size))]
            drawn.append(start + np.concatenate(laps)[:count])
        return rng.permutation(np.concatenate(drawn)).astype(self._index)

    def _by_tokens(self, examples: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        order = examples[np.argsort(self.lengths[examples], kind="stable")]  # `examples` is shuffled: random ties
        del examples
        sorted_lengths = self.lengths[order]
        values, firsts = np.unique(sorted_lengths, return_index=True)
        sizes, filled = [], 0  # greedy: add while (longest so far) × (count + 1) <= max_tokens
        for length, count in zip(values.tolist(), np.diff([*firsts, len(order)]).tolist(), strict=True):
            fits = max(self.max_tokens // max(length, 1), 1)  # type: ignore[operator]
            if filled:
                take = min(count, max(fits - filled, 0))
                sizes[-1] += take
                filled += take
                count -= take
            full, rest = divmod(count, fits)
            sizes += [fits] * full + ([rest] if rest else [])
            filled = rest if rest else (fits if full else filled)
        batches = np.split(order, np.cumsum(sizes)[:-1]) if sizes else []
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batches(self) -> list[np.ndarray]:
        """This rank's batches of the current epoch (index arrays)."""
        if self._drawn is None or self._drawn[0] != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            if self.max_tokens is not None:
                batches = self._by_tokens(self._examples(rng), rng)
            else:
                examples = self._examples(rng)
                batches = [examples[i : i + self.batch_size] for i in range(0, len(examples), self.batch_size)]
            batches += batches[: -len(batches) % self.num_replicas]
            self._drawn = (self.epoch, batches[self.rank :: self.num_replicas])
        return self._drawn[1]

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: the batches are drawn at the first `next`, after the loop has set the epoch.
        batches = self.batches()
        if self.skip[0] == self.epoch:
            batches, self.skip = batches[self.skip[1] :], (0, 0)
        for batch in batches:
            yield batch.tolist()

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


def epoch_position(loop: Any) -> tuple[int, int, bool]:
    """(epoch, batches trained in it, cut short) from Lightning's fit loop. Cut short: training stopped inside the
    epoch (`max_steps`, `max_time`), which Lightning then counts as processed, as if it had run to its end; a
    checkpoint written after that must resume inside it."""
    epochs, batches = loop.epoch_progress.current, loop.epoch_loop.batch_progress
    cut_short = epochs.started == epochs.processed > 0 and batches.current.processed and not batches.is_last_batch
    return epochs.processed - cut_short, batches.current.processed, bool(cut_short)
