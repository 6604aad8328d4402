"""Reading text files: TSV/CSV/Parquet tables (optionally compressed) in chunks, aligned line files in pairs."""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from seq2seq.errors import DataError

CHUNK = 10_000  # rows per run a reader yields
TABLES = (".tsv", ".csv", ".parquet")
COMPRESSED = (".gz", ".zst", ".bz2", ".lz4")  # decompressed by pyarrow, by file name


def table_kind(path: str) -> str | None:
    name = path
    for suffix in COMPRESSED:
        name = name.removesuffix(suffix)
    return next((kind for kind in TABLES if name.endswith(kind)), None)


def _open(path: str) -> pa.NativeFile:
    try:
        return pa.input_stream(path, compression="detect")
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: {err}") from None


def table_chunks(path: str, columns: list[str]) -> Iterator[pd.DataFrame]:
    """A table file in chunks of CHUNK rows, every field as text: nothing becomes NaN, blank lines stay rows,
    undecodable bytes become U+FFFD. A missing or empty file, a missing column or a row with the wrong number of
    fields is a DataError naming the file (and the line)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file; set `data.path` (and `data.val_path`, `data.test_path`)")
    if table_kind(path) == ".parquet":
        try:
            parquet = pq.ParquetFile(path)
            _check_columns(path, columns, parquet.schema_arrow.names)
            for batch in parquet.iter_batches(CHUNK, columns=columns):
                yield batch.to_pandas().fillna("").astype(str)  # a null cell is empty text, rejected by reason
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"{path}: not a readable Parquet file ({err})") from None
        return
    tsv = table_kind(path) == ".tsv"
    with _open(path) as stream:
        try:
            chunks = pd.read_csv(stream, sep="\t" if tsv else ",", dtype=str, keep_default_na=False, na_filter=False,
                                 skip_blank_lines=False, encoding="utf-8", encoding_errors="replace",
                                 quoting=3 if tsv else 0, chunksize=CHUNK)
            for chunk in chunks:
                _check_columns(path, columns, list(chunk.columns))
                yield chunk
        except pd.errors.EmptyDataError:
            raise DataError(f"{path}: the file is empty; it needs a header row naming the columns") from None
        except OSError as err:  # a compressed file cut short, or a failing disk
            raise DataError(f"{path}: {err}: the file is damaged or cut short (an interrupted download or copy?); "
                            "get it again") from None
        except pd.errors.ParserError as err:
            detail = str(err).split("C error: ")[-1].strip()
            raise DataError(f"{path}: {detail}. A row must have one field per header column"
                            + ("; a tab inside a sentence must be removed" if tsv else "; quote fields that hold "
                               "commas")) from None


def _check_columns(path: str, wanted: list[str], found: list[str]) -> None:
    missing = [c for c in wanted if c not in found]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {found}. Set `data.source`, `data.target` and "
                        "`data.split_column` (null to split by hash)")


def line_pairs(src_path: str, tgt_path: str) -> Iterator[list[tuple[str, str]]]:
    """Aligned text files, one sentence per line (split on newlines only), in runs of CHUNK pairs."""
    with _open(src_path) as a, _open(tgt_path) as b:
        sources = io.TextIOWrapper(a, encoding="utf-8", errors="replace", newline="\n")
        targets = io.TextIOWrapper(b, encoding="utf-8", errors="replace", newline="\n")
        run: list[tuple[str, str]] = []
        for n, (src, tgt) in enumerate(itertools.zip_longest(sources, targets), 1):
            if src is None or tgt is None:
                longer, shorter = (src_path, tgt_path) if tgt is None else (tgt_path, src_path)
                raise DataError(f"{shorter} ends at line {n - 1} and {longer} goes on: aligned files need one "
                                "sentence per line on both sides")
            run.append((src.removesuffix("\n").removesuffix("\r"), tgt.removesuffix("\n").removesuffix("\r")))
            if len(run) == CHUNK:
                yield run
                run = []
        if run:
            yield run
