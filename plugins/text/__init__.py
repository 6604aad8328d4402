"""Text domain: parallel sentences in one language -> sentences in another.

Contract. A raw item is a string. Tokenizers are trained locally on the training split and saved inside the
checkpoint (`tokenizers.py`): `bpe` (HF `tokenizers` with Metaspace pre-tokenization, so spaces survive decoding;
the default), `sentencepiece` (unigram or BPE), `char` and `word`. All share the special ids pad 0, bos 1, eos 2,
unk 3, and `decode` gives back detokenized text, which is what metrics score. The core's `token` embedding and tied
`linear` head do the rest.

The `parallel` reader streams TSV/CSV/Parquet tables (optionally .gz/.zst/.bz2; column names by config;
`files.py`) or aligned text files (`train.ko` + `train.en`), from files, globs or lists of them, or several
weighted `corpora`. Text is read as text: "NA", "null" and "" stay strings, blank lines are rows. Rows are
rejected, and counted by reason, for an empty side, undecodable bytes, more than `max_chars` characters on a side,
or a length ratio above `max_ratio`.
Splits come from separate files (`val_path`, `test_path`), a split column, or deterministically from a hash of the
source text. After training, the reader's `report` saves cross-attention heatmaps of a few validation sentences
(`attention.py`). Its metrics are sacreBLEU's BLEU, chrF and chrF++ (`metrics.py`).
"""

from __future__ import annotations

import glob
import hashlib
from collections import Counter
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seq2seq.domain import Decodes, Reader, Rows, read_lines
from seq2seq.errors import ConfigError, DataError, some
from seq2seq.registry import DATASETS
from seq2seq_plugins.text.files import COMPRESSED, line_pairs, table_chunks, table_kind
from seq2seq_plugins.text.metrics import BLEU, ChrF, ChrFPlusPlus  # noqa: F401 - importing registers them
from seq2seq_plugins.text.pretrained import MarianTokenizer, NllbTokenizer  # noqa: F401 - importing registers them
from seq2seq_plugins.text.tokenizers import (  # noqa: F401 - importing registers the tokenizers
    BPETokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
)

EMBEDDED = Path(__file__).parent / "data" / "libreoffice_help_ko_en.tsv.gz"


def _split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    u = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 1_000_000 / 1_000_000
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


@dataclass(frozen=True)
class Source:
    """One input of the reader: a table file, or a pair of aligned text files; `split` when the file is one
    split's (else each row's split comes from the split column or a hash)."""

    files: tuple[str, ...]
    corpus: int = 0
    split: str | None = None


@DATASETS.register("parallel")
class ParallelCorpus(Reader):
    """Sentence pairs from TSV/CSV/Parquet tables (optionally .gz/.zst/.bz2) or aligned text files.

    `path` is a file, a glob or a list of them; a path that is not a table names aligned files by prefix:
    `corpora/train` reads `corpora/train.<source>` and `corpora/train.<target>` (each optionally compressed).
    `corpora` lists several such inputs with training weights instead: `[{path: ..., weight: 2.0}, ...]`.
    The split is the file's (`val_path`/`test_path`), else `split_column`'s (tables), else a hash's.
    """

    def __init__(  # noqa: PLR0913 - flat options are the schema of the `data:` block
        self,
        path: str | list[str] | None = None,
        source: str = "ko",
        target: str = "en",
        split_column: str | None = "split",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_chars: int = 1000,
        max_ratio: float = 9.0,
        val_path: str | list[str] | None = None,
        test_path: str | list[str] | None = None,
        corpora: list[dict[str, Any]] | None = None,
    ) -> None:
        if (val_path is None) != (test_path is None):
            raise ConfigError("give both `data.val_path` and `data.test_path`, or neither")
        if corpora is not None and path is not None:
            raise ConfigError("give `data.path` or `data.corpora`, not both")
        corpora = corpora or [{"path": path or str(EMBEDDED)}]
        for i, corpus in enumerate(corpora):
            unknown = sorted(set(corpus) - {"path", "weight"})
            if unknown or "path" not in corpus:
                raise ConfigError(f"`data.corpora[{i}]` takes `path` (required) and `weight`, got {sorted(corpus)}")
            if not (isinstance(corpus.get("weight", 1.0), (int, float)) and corpus.get("weight", 1.0) > 0):
                raise ConfigError(f"`data.corpora[{i}].weight` must be a positive number, got {corpus['weight']!r}")
        self.corpora = [(c["path"], float(c.get("weight", 1.0))) for c in corpora]
        self.corpus_weights = tuple(w for _, w in self.corpora)
        self.held_out = {"val": val_path, "test": test_path} if val_path is not None else {}
        self.source, self.target, self.split_column = source, target, split_column
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_chars, self.max_ratio = max_chars, max_ratio

    def _expand(self, paths: str | list[str], option: str) -> list[tuple[str, ...]]:
        """Paths or globs -> inputs: (table,) or (source file, target file)."""
        found = []
        for pattern in [paths] if isinstance(paths, str) else paths:
            if table_kind(pattern) is None:
                found.append(tuple(self._side(pattern, lang, option) for lang in (self.source, self.target)))
            elif glob.has_magic(pattern):
                matches = sorted(glob.glob(pattern))
                if not matches:
                    raise DataError(f"`{option}={pattern}` matches no file")
                found += [(m,) for m in matches]
            else:
                found.append((pattern,))
        return found

    def _side(self, prefix: str, lang: str, option: str) -> str:
        for suffix in ("", *COMPRESSED):
            if Path(f"{prefix}.{lang}{suffix}").is_file():
                return f"{prefix}.{lang}{suffix}"
        raise DataError(f"`{option}={prefix}`: no such file. A table needs a .tsv, .csv or .parquet name; aligned "
                        f"text files are named by prefix, and {prefix}.{lang} is not there")

    def sources(self, splits: Iterable[str] = ("train", "val", "test")) -> list[Source]:
        """The inputs that hold rows of `splits`."""
        wanted = set(splits)
        found = []
        for corpus, (paths, _) in enumerate(self.corpora):
            if not self.held_out or "train" in wanted:
                split = "train" if self.held_out else None
                found += [Source(files, corpus, split) for files in self._expand(paths, "data.path")]
        for split, paths in self.held_out.items():
            if split in wanted:
                found += [Source(files, 0, split) for files in self._expand(paths, f"data.{split}_path")]
        return found

    def files(self) -> list[str]:
        names = [name for source in self.sources() for name in source.files]
        for name in names:
            if not Path(name).is_file():
                raise DataError(f"{name}: no such file; set `data.path` (and `data.val_path`, `data.test_path`)")
        return names

    def _reason(self, src: str, tgt: str) -> str | None:
        if not src.strip() and not tgt.strip():
            return "blank line"
        if "\ufffd" in src or "\ufffd" in tgt:
            return "undecodable text"
        if not src.strip():
            return "empty source"
        if not tgt.strip():
            return "empty target"
        if max(len(src), len(tgt)) > self.max_chars:
            return f"longer than {self.max_chars} characters"
        if max(len(src), len(tgt)) > self.max_ratio * min(len(src), len(tgt)):
            return f"length ratio above {self.max_ratio}"
        return None

    def _runs(self, source: Source) -> Iterator[tuple[list[tuple[str, str]], list[str]]]:
        """(pairs, their splits) of an input, a run at a time."""
        if len(source.files) == 2:
            for pairs in line_pairs(*source.files):
                yield pairs, [source.split or self._hashed(s, t) for s, t in pairs]
            return
        path = source.files[0]
        by_column = source.split is None and self.split_column is not None
        columns = [self.source, self.target] + ([self.split_column] if by_column else [])  # type: ignore[list-item]
        line = 2  # the first data row's line (after the header)
        for chunk in table_chunks(path, columns):
            pairs = list(zip(chunk[self.source].tolist(), chunk[self.target].tolist(), strict=True))
            if source.split is not None:
                splits = [source.split] * len(pairs)
            elif by_column:
                splits = chunk[self.split_column].tolist()
                for i, ((src, tgt), split) in enumerate(zip(pairs, splits, strict=True)):
                    if split not in self.splits:
                        if not (src.strip() or tgt.strip() or split.strip()):
                            splits[i] = "train"  # a blank line belongs to no split: counted with the training rows
                            continue
                        bad = [line + j for j, s in enumerate(splits) if s not in self.splits and s.strip()]
                        raise DataError(f"{path}: `{self.split_column}` must be train, val or test; lines {some(bad)}")
            else:
                splits = [self._hashed(s, t) for s, t in pairs]
            line += len(pairs)
            yield pairs, splits

    def _hashed(self, src: str, tgt: str) -> str:
        return _split_of(src, self.val_fraction, self.test_fraction)

    def stream(self, splits: Collection[str]) -> Iterator[Rows]:
        for source in self.sources(splits):
            name = " + ".join(source.files)
            for pairs, split_of in self._runs(source):
                runs = {s: Rows(s, [], Counter(), name, source.corpus) for s in splits}
                for (src, tgt), split in zip(pairs, split_of, strict=True):
                    if split not in runs:
                        continue
                    reason = self._reason(src, tgt)
                    if reason:
                        runs[split].rejected[reason] += 1
                    else:
                        runs[split].pairs.append((src.strip(), tgt.strip()))
                yield from (rows for rows in runs.values() if rows.examples_read)

    def report(self, translator: Decodes, run_dir: Path) -> dict[str, float]:
        """Attention heatmaps for the first validation sentences (plots/attention.png); no extra scores."""
        first = next((rows.pairs for rows in self.stream(("val",)) if rows.pairs), [])
        if first:
            (run_dir / "plots").mkdir(exist_ok=True)
            self.plot_attention(translator, [src for src, _ in first[:3]], run_dir / "plots" / "attention.png")
        return {}

    def plot_attention(self, translator: Decodes, sources: list[str], path: Path) -> None:
        from seq2seq_plugins.text.attention import plot_attention

        plot_attention(translator, sources, path)

    def write_sample(self, folder: Path) -> tuple[dict[str, Any], dict[str, int]]:
        """A TSV of 10 rows per split, two of each with an empty side."""
        split = self.split_column or "split"
        rows = [f"{self.source}\t{self.target}\t{split}"]
        for i in range(30):
            src, tgt = f"문장 {i}", "" if i % 5 == 4 else f"sentence {i}"
            rows.append(f"{src}\t{tgt}\t{('train', 'val', 'test')[i % 3]}")
        path = folder / "sample.tsv"
        path.write_text("\n".join(rows) + "\n", encoding="utf-8")
        options = {"path": str(path), "val_path": None, "test_path": None, "corpora": None, "split_column": split}
        return options, {"train": 10, "val": 10, "test": 10}

    def read_inputs(self, path: str) -> list[str]:
        """One source sentence per line."""
        lines, bad = read_lines(path)
        if bad:
            raise DataError(f"{path}: blank or undecodable line(s) {some(bad)}")
        return lines
