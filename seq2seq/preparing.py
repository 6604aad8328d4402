"""Preparing a dataset (`seq2seq.prepared` describes the result and reads it).

Preparing streams the reader's rows, fits the tokenizers on the training split (or on a reproducible sample of
`tokenizer.fit_sample` pairs) unless their state is given, encodes runs of rows in worker processes through the
encoders' batch call, and writes the shards into `<dir>.partial-<pid>`, renamed into place once complete: a failed or
interrupted preparation leaves the previous dataset whole, and a partial one is never read (the next preparation
removes it).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only

from seq2seq.build import fit_tokenizers, load_tokenizers
from seq2seq.domain import Encoder, Reader, Rows, Tokenizer
from seq2seq.errors import DataError
from seq2seq.outputs import check_folder, read_json, refuse_inputs, replace_folder, storage
from seq2seq.plugins import import_plugins
from seq2seq.prepared import FORMAT, META, REPORT, Prepared, changes, digest
from seq2seq.registry import DATASETS, TOKENIZERS
from seq2seq.schema import to_data
from seq2seq.schemas import TrainConfig

log = logging.getLogger(__name__)


def inputs_of(config: TrainConfig, reader: Reader, files: bool = True) -> dict[str, Any]:
    """What a prepared dataset is computed from: a change in any of it means preparing again. Without `files`,
    the data files are not looked at (a node that has the shards but not the corpus)."""
    found = None
    if files:
        found = []
        for name in reader.files():
            stat = Path(name).stat()
            found.append({"path": str(name), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    tokenizer = {side: TOKENIZERS.with_defaults(spec) if spec else spec
                 for side, spec in to_data(config.tokenizer).items() if side in ("src", "tgt")}
    tokenizer["fit_sample"] = config.tokenizer.fit_sample
    return {"format": FORMAT, "data": DATASETS.with_defaults(config.data), "tokenizer": tokenizer, "files": found}



def _fit_sample(reader: Reader, n: int | None) -> list[tuple[Any, Any]]:
    """The training pairs tokenizers are fitted on: all, or `n` drawn uniformly and reproducibly (a reservoir
    sample with a fixed seed, in one pass, holding `n` pairs)."""
    pairs: list[tuple[Any, Any]] = []
    rng, seen = random.Random(0), 0
    for rows in reader.stream(("train",)):
        if n is None:
            pairs += rows.pairs
            continue
        for pair in rows.pairs:
            seen += 1
            if len(pairs) < n:
                pairs.append(pair)
            elif (j := rng.randrange(seen)) < n:
                pairs[j] = pair
    return pairs


def _ids_type(tok: Encoder) -> pa.DataType:
    if not isinstance(tok, Tokenizer):
        return pa.float32()
    return pa.uint16() if tok.vocab_size <= np.iinfo(np.uint16).max + 1 else pa.int32()


def _column(items: list[Any], kind: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Encoded items (tensors or arrays, or lists of ids) -> one Arrow list column (values flattened) and the
    items' lengths in positions."""
    dtype = kind.to_pandas_dtype()
    lengths = np.fromiter(map(len, items), dtype=np.int32, count=len(items))
    offsets = np.zeros(len(items) + 1, dtype=np.int64)
    if items and isinstance(items[0], list):
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(items), dtype=dtype, count=int(offsets[-1]))
    else:
        arrays = [np.asarray(item).reshape(len(item), -1) for item in items]
        np.cumsum([a.size for a in arrays], out=offsets[1:])
        values = np.concatenate([a.reshape(-1) for a in arrays]).astype(dtype) if arrays else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values)), lengths


@dataclass
class Encoded:
    """One run of rows, encoded: a record batch, and the counts of the rows it came from."""

    split: str
    corpus: int
    file: str
    batch: pa.RecordBatch | None
    examples_read: int
    lines_read: int
    rejected: Counter[str]


_WORKER: tuple[Encoder, Tokenizer] | None = None  # the encoders of a worker process


def _start_worker(config: TrainConfig, tokenizers: dict[str, Any], quiet: bool) -> None:
    global _WORKER
    if quiet:  # a batch call's own threads, times the worker processes, would oversubscribe the cores
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        torch.set_num_threads(1)
    import_plugins(list(config.plugins))
    _WORKER = load_tokenizers(config, tokenizers)


def _encode(rows: Rows) -> Encoded:
    assert _WORKER is not None, "a worker encodes only after _start_worker"
    src_tok, tgt_tok = _WORKER
    rejected = Counter(rows.rejected)
    srcs = src_tok.encode_batch([s for s, _ in rows.pairs])
    tgts = tgt_tok.encode_batch([t for _, t in rows.pairs])
    kept = [i for i, s in enumerate(srcs) if len(s)]
    if len(kept) < len(srcs):
        rejected["empty source"] += len(srcs) - len(kept)
    batch = None
    if kept:
        src, src_len = _column([srcs[i] for i in kept], _ids_type(src_tok))
        tgt, tgt_len = _column([tgts[i] for i in kept], _ids_type(tgt_tok))
        batch = pa.record_batch({"src": src, "tgt": tgt, "src_len": src_len, "tgt_len": tgt_len})
    return Encoded(rows.split, rows.corpus, rows.file, batch, rows.examples_read, rows.lines_read, rejected)


def _encoded(stream: Iterable[Rows], config: TrainConfig, tokenizers: dict[str, Any], workers: int
             ) -> Iterator[Encoded]:
    """Encoded runs in stream order, whatever the number of workers (so are the shards); at most two runs per
    worker are in flight, so memory stays flat."""
    if workers <= 1:
        _start_worker(config, tokenizers, quiet=False)
        yield from map(_encode, stream)
        return
    with ProcessPoolExecutor(workers, mp_context=get_context("forkserver"), initializer=_start_worker,
                             initargs=(config, tokenizers, True)) as pool:
        pending: deque[Future[Encoded]] = deque()
        for rows in stream:
            pending.append(pool.submit(_encode, rows))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


class _Shards:
    """Writes the encoded runs of each (split, corpus) into Arrow files of at most `shard_size` rows."""

    def __init__(self, root: Path, shard_size: int) -> None:
        self.root, self.shard_size = root, shard_size
        self.open: dict[tuple[str, int], tuple[pa.ipc.RecordBatchFileWriter, dict[str, Any]]] = {}
        self.done: dict[tuple[str, int], list[dict[str, Any]]] = {}

    def write(self, key: tuple[str, int], batch: pa.RecordBatch) -> None:
        for start in range(0, batch.num_rows, self.shard_size):
            part = batch.slice(start, self.shard_size)
            if key in self.open and self.open[key][1]["rows"] + part.num_rows > self.shard_size:
                self._close(key)
            if key not in self.open:
                shards = self.done.setdefault(key, [])
                name = f"{key[0]}-{key[1]}-{len(shards):05d}.arrow"
                self.open[key] = (pa.ipc.new_file(self.root / name, part.schema), {"file": name, "rows": 0})
            writer, info = self.open[key]
            writer.write_batch(part)
            info["rows"] += part.num_rows

    def _close(self, key: tuple[str, int]) -> None:
        writer, info = self.open.pop(key)
        writer.close()
        info["bytes"] = (self.root / info["file"]).stat().st_size
        self.done[key].append(info)

    def close(self) -> dict[tuple[str, int], list[dict[str, Any]]]:
        for key in list(self.open):
            self._close(key)
        return self.done


def _counts(encoded: Encoded, report: dict[str, Any]) -> None:
    kept = 0 if encoded.batch is None else encoded.batch.num_rows
    entries = [report]
    if encoded.file:  # rows a reader generated come from no file
        entries.append(report["files"].setdefault(encoded.file, {"lines_read": 0, "examples_read": 0, "kept": 0,
                                                                     "rejected": {}}))
    for entry in entries:
        entry["lines_read"] += encoded.lines_read
        entry["examples_read"] += encoded.examples_read
        entry["kept"] += kept
        for reason, n in encoded.rejected.items():
            entry["rejected"][reason] = entry["rejected"].get(reason, 0) + n


def prepare_dataset(config: TrainConfig, reader: Reader, dest: Path, tokenizers: dict[str, Any] | None = None,
            splits: tuple[str, ...] | None = None, workers: int = 1, shard_size: int = 1_000_000) -> Prepared:
    """Encode the reader's splits into a prepared dataset at `dest` (replacing one there only once complete)."""
    splits = splits or reader.splits
    inputs = inputs_of(config, reader)
    dest.parent.mkdir(parents=True, exist_ok=True)
    for stale in dest.parent.glob(f"{dest.name}.partial-*"):
        log.info("removing %s, a preparation that did not finish", stale)
        shutil.rmtree(stale, ignore_errors=True)
    partial = dest.with_name(f"{dest.name}.partial-{os.getpid()}")
    partial.mkdir()
    started = time.monotonic()
    try:
        if tokenizers is None:
            sample = _fit_sample(reader, config.tokenizer.fit_sample)
            if not sample:
                raise DataError("the training split has no examples to fit the tokenizers on; check `data.*`")
            log.info("fitting the tokenizers on %d training pairs", len(sample))
            tokenizers = fit_tokenizers(config, sample)
            del sample
        report = {s: {"lines_read": 0, "examples_read": 0, "kept": 0, "rejected": {}, "files": {}}
                  for s in splits}
        shards = _Shards(partial, shard_size)
        for encoded in _encoded(reader.stream(splits), config, tokenizers, workers):
            _counts(encoded, report[encoded.split])
            if encoded.batch is not None:
                shards.write((encoded.split, encoded.corpus), encoded.batch)
        written = shards.close()
        for split, entry in report.items():
            assert entry["kept"] + sum(entry["rejected"].values()) == entry["examples_read"], f"{split}: counts"
            entry["shards"] = {str(c): written.get((split, c), []) for c in range(len(reader.corpus_weights))}
        meta = {"format": FORMAT, "fingerprint": digest(inputs), "inputs": inputs, "tokenizers": tokenizers,
                "tokenizers_digest": digest(tokenizers), "corpus_weights": list(reader.corpus_weights),
                "splits": report}
        (partial / META).write_text(json.dumps(meta, indent=1) + "\n")
        counts = {split: {k: v for k, v in entry.items() if k != "shards"} for split, entry in report.items()}
        (partial / REPORT).write_text(json.dumps(counts, indent=2) + "\n")
        replace_folder(partial, dest)
    except OSError as err:  # a full disk is named with the path; anything else goes on as it is
        shutil.rmtree(partial, ignore_errors=True)
        with storage("the prepared dataset", dest, "the dataset there before is intact" if dest.exists()
                     else "nothing was written there"):
            raise err from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    pairs = sum(entry["kept"] for entry in report.values())
    log.info("prepared %d examples (%s) into %s in %.1f s", pairs,
             ", ".join(f"{s} {e['kept']}" for s, e in report.items()), dest, time.monotonic() - started)
    return Prepared(dest)


def owned(dest: Path) -> set[str]:
    """The files of `dest` that a preparation wrote (its meta.json and the shards it lists)."""
    meta = read_json(dest / META)
    if meta is None or meta.get("format") is None:
        return set()
    shards = (s["file"] for entry in meta.get("splits", {}).values() for c in entry.get("shards", {}).values()
              for s in c)
    return {META, REPORT, *shards}


def obtain(config: TrainConfig, reader: Reader, dest: Path, tokenizers: dict[str, Any] | None = None,
           strict: bool = False, remedy: str = "", workers: int | None = None, shard_size: int = 1_000_000
           ) -> Prepared:
    """The prepared dataset at `dest` for this config and tokenizers: the one there if it matches, else prepared
    there by global rank 0 while the other processes wait for it. With `strict`, one that does not match is an
    error (a dataset the user named is never replaced behind their back); otherwise it is prepared again. A
    folder holding files a preparation did not write is replaced only with `config.force`, and one holding the
    data never (`seq2seq.outputs`)."""
    meta = dest / META
    try:
        inputs = inputs_of(config, reader)
    except DataError as err:
        if not meta.is_file():
            raise
        log.warning("the data files cannot be checked here (%s); using %s as it was prepared", err, dest)
        inputs = inputs_of(config, reader, files=False)
    refuse_inputs("prepared", dest, [f["path"] for f in inputs["files"] or []])
    if rank_zero_only.rank != 0:
        waited = 0
        while not (meta.is_file() and not changes(json.loads(meta.read_text())["inputs"], inputs)):
            if waited % 60 == 0:
                log.info("waiting for rank 0 to prepare %s", dest)
            time.sleep(1)
            waited += 1
        return Prepared(dest)
    if meta.is_file():
        try:
            found = Prepared(dest)  # a damaged one is an error, or prepared again
            found.check(inputs, tokenizers, remedy)
            log.info("using the prepared dataset %s (fingerprint %s)", dest, found.fingerprint)
            return found
        except DataError as err:
            if strict:
                raise
            log.info("preparing again: %s", err)
    check_folder("prepared", dest, owned, config.force)
    workers = max(1, config.loader.num_workers) if workers is None else workers
    return prepare_dataset(config, reader, dest, tokenizers, workers=workers, shard_size=shard_size)

