"""Text domain: parallel sentences in one language -> sentences in another.

Contract. A raw item is a string. Tokenizers are trained locally on the training split and saved inside the
checkpoint (`tokenizers.py`): `bpe` (HF `tokenizers` with Metaspace pre-tokenization, so spaces survive decoding;
the default), `sentencepiece` (unigram or BPE), `char` and `word`. All share the special ids pad 0, bos 1, eos 2,
unk 3, and `decode` gives back detokenized text, which is what metrics score. The core's `token` embedding and tied
`linear` head do the rest.

The `parallel` reader takes TSV/CSV/Parquet (optionally .gz), column names by config. Text is read as text: "NA",
"null" and "" stay strings, blank lines are rows. Rows are rejected, and counted by reason, for an empty side,
undecodable bytes, more than `max_chars` characters on a side, or a length ratio above `max_ratio`.
Splits come from separate files (`val_path`, `test_path`), a split column, or deterministically from a hash of the
source text. After training, the reader's `report` saves cross-attention heatmaps of a few validation sentences
(`attention.py`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from torch import Tensor
from torchmetrics.text import CHRFScore, SacreBLEUScore

from seq2seq.domain import Reader, Split, read_lines
from seq2seq.errors import ConfigError, DataError
from seq2seq.registry import DATASETS, METRICS
from seq2seq_plugins.text.tokenizers import (  # noqa: F401 - importing registers the tokenizers
    BPETokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
)

if TYPE_CHECKING:
    from seq2seq.translate import Translator

EMBEDDED = Path(__file__).parent / "data" / "libreoffice_help_ko_en.tsv.gz"


@METRICS.register("bleu")
class BLEU(SacreBLEUScore):
    """Corpus SacreBLEU (13a tokenization) on detokenized hypotheses and references, on the 0-100 scale."""

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenize="13a")
        self.detokenize = tokenizer.decode

    def update(self, hyps: list[list[int]], refs: list[list[int]]) -> None:  # type: ignore[override]
        super().update([self.detokenize(h) for h in hyps], [[self.detokenize(r)] for r in refs])

    def compute(self) -> Tensor:
        return super().compute() * 100


@METRICS.register("chrf")
class ChrF(CHRFScore):
    """Corpus chrF (character 6-grams, no word n-grams: not chrF++) on detokenized text, on the 0-100 scale.

    Zero n-gram counts are smoothed as in the original chrF++.py, i.e. sacrebleu's `CHRF(eps_smoothing=True)`;
    sacrebleu's default differs in the second decimal on short corpora.
    """

    def __init__(self, tokenizer: Any) -> None:
        super().__init__(n_word_order=0)
        self.detokenize = tokenizer.decode

    def update(self, hyps: list[list[int]], refs: list[list[int]]) -> None:  # type: ignore[override]
        super().update([self.detokenize(h) for h in hyps], [[self.detokenize(r)] for r in refs])

    def compute(self) -> Tensor:  # type: ignore[override]
        return super().compute() * 100


def read_table(path: str | Path) -> pd.DataFrame:
    """Every row as text: nothing becomes NaN, blank lines stay rows, undecodable bytes become U+FFFD. A missing or
    empty file, or a row with the wrong number of fields, is a DataError naming the file (and the line)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file; set `data.path` (and `data.val_path`, `data.test_path`)")
    name = str(path).removesuffix(".gz")
    if name.endswith(".parquet"):
        return pd.read_parquet(path).astype(str)
    tsv = name.endswith(".tsv")
    try:
        return pd.read_csv(path, sep="\t" if tsv else ",", dtype=str, keep_default_na=False, na_filter=False,
                           skip_blank_lines=False, encoding="utf-8", encoding_errors="replace",
                           quoting=3 if tsv else 0)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; it needs a header row naming the columns") from None
    except pd.errors.ParserError as err:
        detail = str(err).split("C error: ")[-1].strip()
        raise DataError(f"{path}: {detail}. A row must have one field per header column"
                        + ("; a tab inside a sentence must be removed" if tsv else "; quote fields that hold commas")
                        ) from None


def _split_of(text: str, val_fraction: float, test_fraction: float) -> str:
    u = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 1_000_000 / 1_000_000
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


@DATASETS.register("parallel")
class ParallelCorpus(Reader):
    """Sentence pairs; the split is the file's (`val_path`/`test_path`), else `split_column`'s, else a hash's."""

    def __init__(  # noqa: PLR0913 - flat options are the schema of the `data:` block
        self,
        path: str | None = None,
        source: str = "ko",
        target: str = "en",
        split_column: str | None = "split",
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_chars: int = 1000,
        max_ratio: float = 9.0,
        val_path: str | None = None,
        test_path: str | None = None,
    ) -> None:
        if (val_path is None) != (test_path is None):
            raise ConfigError("give both `data.val_path` and `data.test_path`, or neither")
        self.path = path or str(EMBEDDED)
        self.files = {"train": self.path, "val": val_path, "test": test_path} if val_path else None
        self.source, self.target, self.split_column = source, target, split_column
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.max_chars, self.max_ratio = max_chars, max_ratio
        self._frame: pd.DataFrame | None = None

    def _table(self, path: str, split_column: str | None) -> pd.DataFrame:
        frame = read_table(path)
        wanted = [self.source, self.target] + ([split_column] if split_column else [])
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}. Set "
                            "`data.source`, `data.target` and `data.split_column` (null to split by hash)")
        return frame

    def frame(self) -> pd.DataFrame:
        if self._frame is None and self.files:
            self._frame = pd.concat([self._table(path, None).assign(_split=split)
                                     for split, path in self.files.items()], ignore_index=True)
        if self._frame is None:
            frame = self._table(self.path, self.split_column)
            if self.split_column:
                # A blank line belongs to no split: it is counted with the training rows as rejected.
                columns = frame[[self.source, self.target, self.split_column]]
                blank = (columns.apply(lambda c: c.str.strip()) == "").all(axis=1)
                frame.loc[blank, self.split_column] = "train"
                bad = ~frame[self.split_column].isin(self.splits)
                if bad.any():
                    lines = (frame.index[bad] + 2).tolist()[:10]
                    raise DataError(f"{self.path}: `{self.split_column}` must be train, val or test; lines {lines}")
                frame = frame.rename(columns={self.split_column: "_split"})
            else:
                frame = frame.assign(_split=frame[self.source].map(
                    lambda t: _split_of(t, self.val_fraction, self.test_fraction)))
            self._frame = frame
        return self._frame

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

    def read(self, split: str) -> Split:
        rows = self.frame()
        rows = rows[rows["_split"] == split]
        pairs, rejected = [], Counter()
        for src, tgt in zip(rows[self.source], rows[self.target], strict=True):
            reason = self._reason(src, tgt)
            if reason:
                rejected[reason] += 1
            else:
                pairs.append((src.strip(), tgt.strip()))
        return Split(pairs, rows_read=len(rows), rejected=rejected)

    def report(self, translator: Translator, splits: dict[str, Split], run_dir: Path) -> dict[str, float]:
        """Attention heatmaps for the first validation sentences (plots/attention.png); no extra scores."""
        if "val" in splits and splits["val"].pairs:
            (run_dir / "plots").mkdir(exist_ok=True)
            sources = [src for src, _ in splits["val"].pairs[:3]]
            self.plot_attention(translator, sources, run_dir / "plots" / "attention.png")
        return {}

    def plot_attention(self, translator: Translator, sources: list[str], path: Path) -> None:
        from seq2seq_plugins.text.attention import plot_attention

        plot_attention(translator, sources, path)

    def read_inputs(self, path: str) -> list[str]:
        """One source sentence per line."""
        lines, bad = read_lines(path)
        if bad:
            raise DataError(f"{path}: blank or undecodable line(s) {bad[:10]} ({len(bad)} in all)")
        return lines
