"""Prepared datasets, as training reads them: every split encoded once into memory-mapped Apache Arrow shards
that all processes share (`seq2seq.preparing` writes them).

A prepared dataset is a directory:

    meta.json                    what it was prepared from (`inputs`: data and tokenizer options, the data files'
                                 sizes and times) and its fingerprint, the fitted tokenizers' state, and per split:
                                 its shards by corpus, and the file lines and examples read, kept and rejected by
                                 reason, per file
    <split>-<corpus>-<n>.arrow   Arrow IPC files with columns src, tgt (ids, or F values per position, flattened)
                                 and src_len, tgt_len: the lengths index that token-budget batching reads alone

Training reads the shards (`PreparedSplit`): nothing of a split is held in memory but its lengths.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import mmap
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor
from torch.utils.data import Dataset

from seq2seq.errors import DataError

FORMAT = 2  # bumped when the layout changes: an older dataset is then re-prepared, never misread
META = "meta.json"
REPORT = "data_report.json"  # per split and file: rows read, kept, rejected by reason


def digest(data: Any) -> str:
    """A short, stable hash of plain data."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]



def changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two `inputs_of`, in words."""
    found = []
    if old.get("format") != new["format"]:
        found.append(f"the dataset format ({old.get('format')} -> {new['format']})")
    for block in ("data", "tokenizer"):
        a, b = old.get(block, {}), new[block]
        found += [f"`{block}.{k}`: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(a.keys() | b.keys())
                  if a.get(k) != b.get(k)]
    if new["files"] is None:
        return found
    files_a = {f["path"]: f for f in old.get("files") or []}
    files_b = {f["path"]: f for f in new["files"]}
    found += [f"file {p} is no longer read" for p in sorted(files_a.keys() - files_b.keys())]
    found += [f"file {p} is new" for p in sorted(files_b.keys() - files_a.keys())]
    for path in sorted(files_a.keys() & files_b.keys()):
        a, b = files_a[path], files_b[path]
        if (a["bytes"], a["mtime_ns"]) != (b["bytes"], b["mtime_ns"]):
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["mtime_ns"] / 1e9))
            found.append(f"file {path} changed ({a['bytes']} -> {b['bytes']} bytes, modified {when})")
    return found



class Prepared:
    """A prepared dataset on disk, checked whole: every shard is there with the size it was written with."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / META).read_text())
        except (OSError, ValueError) as err:
            raise DataError(f"{self.path} is not a prepared dataset ({err}); write one with `seq2seq prepare ... "
                            f"prepared={self.path}`") from None
        self.tokenizers: dict[str, Any] = self.meta["tokenizers"]
        for split, entry in self.meta["splits"].items():
            for shard in (s for shards in entry["shards"].values() for s in shards):
                file = self.path / shard["file"]
                size = file.stat().st_size if file.is_file() else None
                if size != shard["bytes"]:
                    found = "is missing" if size is None else f"has {size} bytes, not the {shard['bytes']} written"
                    raise DataError(f"{file} {found}: the {split} split of {self.path} is damaged; prepare it again "
                                    "(`seq2seq prepare ...`)")

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def report(self, split: str) -> dict[str, Any]:
        entry = self.meta["splits"][split]
        return {k: entry[k] for k in ("lines_read", "examples_read", "kept", "rejected", "files")}

    def dataset(self, split: str) -> PreparedSplit:
        entry = self.meta["splits"][split]
        shards = [s for c in sorted(entry["shards"], key=int) for s in entry["shards"][c]]
        sizes = [sum(s["rows"] for s in entry["shards"][c]) for c in sorted(entry["shards"], key=int)]
        return PreparedSplit(self.path, [s["file"] for s in shards], sizes)

    def check(self, inputs: dict[str, Any], tokenizers: dict[str, Any] | None, remedy: str) -> None:
        """A DataError naming what changed when this dataset was prepared from other inputs or tokenizers."""
        found = changes(self.meta["inputs"], inputs)
        if tokenizers is not None and digest(tokenizers) != self.meta["tokenizers_digest"]:
            found.append("the tokenizers (the checkpoint's differ from those it was encoded with)")
        if found:
            raise DataError(f"the prepared dataset {self.path} does not match this config: " + "; ".join(found)
                            + f". {remedy}")


def _map(path: Path) -> mmap.mmap:
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


@dataclass(frozen=True)
class _Column:
    """Where one list column of one record batch lies in its shard: its offsets and values, by byte position."""

    offsets: int
    values: int
    dtype: np.dtype
    width: int  # values per position (numeric features), else 1


class PreparedSplit(Dataset[tuple[Tensor, Tensor]]):
    """One split's shards: item i is (src, tgt) as the encoders gave them; corpus c holds items `corpus_ranges[c]`.

    Opening maps each shard once to find its columns and copy out its lengths index, then unmaps it; an item is
    read with positioned reads of exactly its bytes (`os.pread`). Memory-mapped item access would bring in the
    pages around each one it touches (64 KiB with Linux's fault-around), and all of those count in the resident
    set: over a large corpus read in random order it would grow with the corpus and the steps. It pickles without
    its open files (DataLoader workers open their own).
    """

    def __init__(self, root: Path, files: list[str], corpus_sizes: list[int]) -> None:
        self.root, self.files = root, files
        bounds = np.cumsum([0, *corpus_sizes])
        self.corpus_ranges = [(int(a), int(b)) for a, b in itertools.pairwise(bounds)]
        self._index: tuple[list[int], np.ndarray, list[tuple[_Column, _Column]]] | None = None
        self._fds: list[int] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": None}

    def __del__(self) -> None:
        for fd in self._fds or []:
            os.close(fd)

    def _batches(self) -> Iterator[tuple[int, pa.RecordBatch, int]]:
        """(shard number, record batch, the map's address) of every record batch, each shard mapped in turn."""
        for n, name in enumerate(self.files):
            try:
                mapped = _map(self.root / name)
                base = pa.py_buffer(mapped)
                reader = pa.ipc.open_file(base)
                for i in range(reader.num_record_batches):
                    yield n, reader.get_batch(i), base.address
                del reader, base
                mapped.close()
            except (OSError, ValueError, pa.ArrowInvalid) as err:
                raise DataError(f"{self.root / name}: unreadable shard ({err}); prepare the dataset again "
                                "(`seq2seq prepare ...`)") from None

    def _open(self) -> tuple[list[int], np.ndarray, list[tuple[_Column, _Column]]]:
        if self._index is None:
            shard_of, starts, columns = [], [0], []
            for n, batch, base in self._batches():
                shard_of.append(n)
                starts.append(starts[-1] + batch.num_rows)
                columns.append(tuple(_locate(batch, side, base) for side in ("src", "tgt")))
                del batch  # the map closes only once nothing points into it
            self._index = (shard_of, np.array(starts), columns)
        if self._fds is None:
            self._fds = [os.open(self.root / name, os.O_RDONLY) for name in self.files]
        return self._index

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) source and target lengths (int32), read from the lengths index alone."""
        src_len, tgt_len, at = np.zeros(len(self), np.int32), np.zeros(len(self), np.int32), 0
        for _, batch, _ in self._batches():
            src_len[at : at + batch.num_rows] = batch.column("src_len").to_numpy()
            tgt_len[at : at + batch.num_rows] = batch.column("tgt_len").to_numpy()
            at += batch.num_rows
            del batch
        return src_len, tgt_len

    def __len__(self) -> int:
        return self.corpus_ranges[-1][1] if self.corpus_ranges else 0

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        shard_of, starts, columns = self._open()
        b = int(np.searchsorted(starts, i, side="right")) - 1
        j, fd = int(i - starts[b]), self._fds[shard_of[b]]  # type: ignore[index]
        out = []
        for column in columns[b]:
            first, last = np.frombuffer(os.pread(fd, 8, column.offsets + 4 * j), np.int32).tolist()
            size = column.dtype.itemsize
            values = np.frombuffer(os.pread(fd, (last - first) * size, column.values + first * size), column.dtype)
            if column.dtype.kind == "f":
                out.append(torch.from_numpy(values.reshape(-1, column.width).copy()))
            else:
                out.append(torch.from_numpy(values.astype(np.int64)))
        return out[0], out[1]


def _locate(batch: pa.RecordBatch, side: str, base: int) -> _Column:
    """The byte positions, in the mapped file at `base`, of one list column's offsets and values."""
    column = batch.column(side)
    offsets, values = column.offsets, column.values
    positions = int(batch.column(f"{side}_len").to_numpy().sum())
    width = max(len(values) // positions, 1) if positions else 1
    return _Column(offsets=offsets.buffers()[1].address - base + 4 * offsets.offset,
                   values=values.buffers()[1].address - base + values.type.bit_width // 8 * values.offset,
                   dtype=np.dtype(values.type.to_pandas_dtype()), width=width)
