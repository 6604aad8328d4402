"""Random access to encoded examples: memory-mapped Arrow IPC read with pyarrow (what `seq2seq.prepared` does) vs the
same columns through Hugging Face `datasets` (Arrow too, with its own formatting layer).

Token-budget batching reads examples in an arbitrary order, one at a time, so the cost per random item is what
matters; opening cost and the resident set after reading matter for every rank and DataLoader worker.

    pip install datasets          # only for this comparison
    python benchmarks/storage_formats.py --rows 1000000 --reads 100000
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def build(rows: int, rng: np.random.Generator) -> pa.Table:
    columns = {}
    for side, mean in (("src", 40), ("tgt", 38)):
        lengths = rng.integers(4, 2 * mean, rows)
        offsets = np.zeros(rows + 1, np.int32)
        np.cumsum(lengths, out=offsets[1:])
        values = rng.integers(4, 8000, int(offsets[-1])).astype(np.uint16)
        columns[side] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
        columns[f"{side}_len"] = pa.array(lengths.astype(np.int32))
    return pa.table(columns)


def with_pyarrow(path: Path, order: np.ndarray) -> float:
    batch = pa.ipc.open_file(pa.memory_map(str(path))).get_batch(0)
    src = (batch.column("src").offsets.to_numpy(), batch.column("src").values.to_numpy())
    tgt = (batch.column("tgt").offsets.to_numpy(), batch.column("tgt").values.to_numpy())
    started = time.perf_counter()
    for i in order:
        for offsets, values in (src, tgt):
            values[offsets[i] : offsets[i + 1]].astype(np.int64)
    return (time.perf_counter() - started) / len(order) * 1e6


def with_datasets(folder: Path, order: np.ndarray) -> float:
    import datasets

    ds = datasets.load_from_disk(str(folder)).with_format("numpy", columns=["src", "tgt"])
    started = time.perf_counter()
    for i in order:
        item = ds[int(i)]
        item["src"].astype(np.int64), item["tgt"].astype(np.int64)
    return (time.perf_counter() - started) / len(order) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reads", type=int, default=100_000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = build(args.rows, rng)
    order = rng.integers(0, args.rows, args.reads)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.arrow"
        with pa.ipc.new_file(path, table.schema) as writer:
            writer.write_table(table, max_chunksize=args.rows)
        import datasets

        datasets.Dataset(table).save_to_disk(str(Path(tmp) / "hf"))
        del table
        for name, fn, where in (("pyarrow, memory-mapped IPC", with_pyarrow, path),
                                ("datasets, load_from_disk", with_datasets, Path(tmp) / "hf")):
            per_item = min(fn(where, order) for _ in range(3))
            print(f"{name:32s} {per_item:6.2f} µs per random example (src + tgt)")
    print(f"peak resident set {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB")


if __name__ == "__main__":
    main()
