"""Numeric series -> labels: a window of daily readings -> one label per day of the horizon that follows.

Contract. A raw source is a `Window`: W consecutive days of F features (readings, plus day-of-year sin/cos when
`calendar` is on), the day it ends, and the labels observed over those days (baselines use them; the model does
not). A raw target is the list of the next H labels. The `standardize` tokenizer scales sources with statistics of
the training windows only; the `labels` tokenizer maps label values to ids and names them (`label_ids`), so the core
decodes nothing but labels; the `linear` embedding maps F values to d_model. The embedded data set is NOAA daily
temperatures at Clemson, SC, and Atlantic storm onsets (`data/README.md`); `build_data.py` rebuilds it.

Rows are read as text and checked: a bad date, number or label is an error naming its CSV line. Missing readings
follow `nan_policy`: `error` (default; names the lines), `impute` (`impute_method` ffill or linear interpolation,
across at most `impute_limit` consecutive missing days), or
`mask` (kept; the tokenizer then needs `mask_missing: true`, which zeroes them and adds indicator features).
Windows are rejected, and counted, when they straddle a gap in the dates, cross a split boundary, or (after
imputation) still miss a reading or a label. Splits are by year, so no window sees the future of another split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from seq2seq.domain import FeatureEncoder, Reader, Rows, Tokenizer
from seq2seq.errors import ConfigError, DataError
from seq2seq.registry import DATASETS, EMBEDDINGS, TOKENIZERS

if TYPE_CHECKING:
    from seq2seq.translate import Translator

EMBEDDED = Path(__file__).parent / "data" / "clemson_storms.csv"
SPECIALS = ("<pad>", "<bos>", "<eos>")
NAN_POLICIES = ("error", "impute", "mask")
IMPUTE_METHODS = ("ffill", "interpolate")


@dataclass
class Window:
    """One input window: values (W, F) float32, its last date, and the labels observed on its days (W,)."""

    values: np.ndarray
    end: pd.Timestamp
    past_labels: np.ndarray


@TOKENIZERS.register("standardize")
class Standardizer(FeatureEncoder):
    """Scales each feature to zero mean, unit variance, with statistics fitted on training windows."""

    def __init__(self, mask_missing: bool = False) -> None:
        self.mask_missing = mask_missing
        self.mean: list[float] = []
        self.std: list[float] = []

    @property
    def n_features(self) -> int:
        return len(self.mean) * (2 if self.mask_missing else 1)

    def fit(self, items: list[Window]) -> None:
        values = np.concatenate([w.values for w in items])  # (rows, F)
        std = np.nanstd(values, axis=0)
        self.load_state_dict({"mean": np.nanmean(values, axis=0).tolist(), "std": np.where(std > 0, std, 1).tolist()})

    def encode(self, item: Window) -> Tensor:
        x = (item.values - np.asarray(self.mean)) / np.asarray(self.std)  # (W, F)
        missing = np.isnan(x)
        if missing.any() and not self.mask_missing:
            raise DataError(f"window ending {item.end.date()} has missing readings; set `tokenizer.src.mask_missing"
                            "=true` to mask them, or choose another `data.nan_policy`")
        if self.mask_missing:
            x = np.concatenate([np.where(missing, 0.0, x), missing], axis=1)  # (W, 2F): values, indicators
        return torch.as_tensor(x, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.std = list(state["mean"]), list(state["std"])


@TOKENIZERS.register("labels")
class LabelTokenizer(Tokenizer):
    """A small target vocabulary: the specials, then one id per label value seen in training."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.classes: list[int] = []

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.classes)

    @property
    def label_ids(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(range(len(SPECIALS), self.vocab_size))

    def fit(self, items: list[list[int]]) -> None:
        self.classes = sorted({int(v) for item in items for v in item})

    def encode(self, item: list[int]) -> Tensor:
        return torch.tensor([len(SPECIALS) + self.classes.index(int(v)) for v in item], dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(self.classes[i - len(SPECIALS)]) for i in ids if i >= len(SPECIALS))

    def state_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes = list(state["classes"])


@EMBEDDINGS.register("linear")
class ValueEmbedding(nn.Module):
    """Feature vectors (B, W, F) -> (B, W, D) by one linear map."""

    def __init__(self, n_features: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_features, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


def _bad_lines(mask: pd.Series) -> list[int]:
    return (mask[mask].index + 2).tolist()[:10]  # CSV line numbers: header is line 1


def read_daily_csv(path: str | Path, date_column: str, columns: list[str]) -> pd.DataFrame:
    """Read a daily CSV as text, then parse and check it; errors name the file, the column and CSV lines."""
    raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False)
    missing = [c for c in [date_column, *columns] if c not in raw.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; found {list(raw.columns)}")
    frame = pd.DataFrame({"date": pd.to_datetime(raw[date_column].str.strip(), errors="coerce", format="%Y-%m-%d")})
    if frame["date"].isna().any():
        raise DataError(f"{path}: unreadable `{date_column}` (want YYYY-MM-DD) on line(s) "
                        f"{_bad_lines(frame['date'].isna())}")
    for c in columns:
        text = raw[c].str.strip()
        frame[c] = pd.to_numeric(text.replace("", np.nan), errors="coerce")
        bad = frame[c].isna() & (text != "") | np.isinf(frame[c])
        if bad.any():
            raise DataError(f"{path}: column `{c}` is not a finite number on line(s) {_bad_lines(bad)}")
    if frame["date"].duplicated().any():
        raise DataError(f"{path}: repeated dates on line(s) {_bad_lines(frame['date'].duplicated())}")
    return frame.sort_values("date").reset_index(drop=True)


@DATASETS.register("daily_windows")
class DailyWindows(Reader):
    """Windows of `window` days -> labels of the next `horizon` days, split by year (`val_from`, `test_from`)."""

    def __init__(  # noqa: PLR0913 - flat options are the schema of the `data:` block
        self,
        path: str | None = None,
        features: list[str] | None = None,
        label: str = "onset",
        date_column: str = "date",
        window: int = 30,
        horizon: int = 7,
        stride: int = 1,
        calendar: bool = True,
        nan_policy: str = "error",
        impute_method: str = "ffill",
        impute_limit: int = 3,
        val_from: int = 2010,
        test_from: int = 2015,
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ConfigError(f"`data.nan_policy` must be one of {', '.join(NAN_POLICIES)}, got {nan_policy!r}")
        if impute_method not in IMPUTE_METHODS:
            raise ConfigError(f"`data.impute_method` must be one of {', '.join(IMPUTE_METHODS)}, got {impute_method!r}")
        if min(window, horizon, stride) < 1:
            raise ConfigError("`data.window`, `data.horizon` and `data.stride` must be positive")
        if not val_from <= test_from:
            raise ConfigError(f"need `data.val_from` ({val_from}) <= `data.test_from` ({test_from})")
        self.path = path or str(EMBEDDED)
        self.features = features or ["tmin", "tmax"]
        self.label, self.date_column = label, date_column
        self.window, self.horizon, self.stride, self.calendar = window, horizon, stride, calendar
        self.nan_policy, self.impute_method, self.impute_limit = nan_policy, impute_method, impute_limit
        self.bounds = {"train": (None, val_from), "val": (val_from, test_from), "test": (test_from, None)}
        self._frame: pd.DataFrame | None = None

    def _prepare(self, frame: pd.DataFrame, path: str) -> pd.DataFrame:
        """Apply the NaN policy to the readings and add calendar features."""
        gaps = frame[self.features].isna().any(axis=1)
        if gaps.any() and self.nan_policy == "error":
            raise DataError(f"{path}: {int(gaps.sum())} row(s) with a missing reading, line(s) {_bad_lines(gaps)}; "
                            "set `data.nan_policy=impute` (forward-fill) or `mask`")
        if self.nan_policy == "impute":
            for c in self.features:
                col = frame[c]
                run = col.isna().groupby(col.notna().cumsum()).transform("sum")  # length of each missing run
                filled = col.ffill() if self.impute_method == "ffill" else col.interpolate(limit_area="inside")
                frame[c] = filled.where(col.notna() | (run <= self.impute_limit))  # longer runs stay missing
        if self.calendar:
            angle = 2 * np.pi * frame["date"].dt.day_of_year.to_numpy() / 365.25
            frame = frame.assign(doy_sin=np.sin(angle), doy_cos=np.cos(angle))
        return frame

    @property
    def columns(self) -> list[str]:
        return self.features + (["doy_sin", "doy_cos"] if self.calendar else [])

    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            frame = read_daily_csv(self.path, self.date_column, [*self.features, self.label])
            self._frame = self._prepare(frame, self.path)
        return self._frame

    def _windows(self, frame: pd.DataFrame, span: int, split: str | None) -> tuple[list[int], Counter[str]]:
        """Start rows of complete windows of `span` days, and rejections, among windows starting in `split`'s years.

        A window that starts in one split and ends in the next is rejected (and counted) by the split it starts in.
        """
        days = (frame["date"] - frame["date"].iloc[0]).dt.days.to_numpy()
        years = frame["date"].dt.year.to_numpy()
        starts, rejected = [], Counter()
        lo, hi = self.bounds[split] if split else (None, None)
        for i in range(0, len(frame) - span + 1, self.stride):
            first, last = years[i], years[i + span - 1]
            if (lo is not None and first < lo) or (hi is not None and first >= hi):
                continue  # starts in another split
            if days[i + span - 1] - days[i] != span - 1:
                rejected["straddles a gap in the dates"] += 1
            elif hi is not None and last >= hi:
                rejected["crosses a split boundary"] += 1
            else:
                starts.append(i)
        return starts, rejected

    def _window(self, frame: pd.DataFrame, i: int) -> Window:
        rows = frame.iloc[i : i + self.window]
        labels = rows[self.label].to_numpy() if self.label in rows else np.full(len(rows), np.nan)
        return Window(rows[self.columns].to_numpy(np.float32), rows["date"].iloc[-1], labels)

    def files(self) -> list[str]:
        if not Path(self.path).is_file():
            raise DataError(f"{self.path}: no such file; set `data.path`")
        return [self.path]

    def stream(self, splits: Collection[str]) -> Iterator[Rows]:
        for split in (s for s in self.splits if s in splits):
            yield self._rows(split)

    def _rows(self, split: str) -> Rows:
        frame = self.frame()
        starts, rejected = self._windows(frame, self.window + self.horizon, split)
        pairs = []
        for i in starts:
            source = self._window(frame, i)
            target = frame[self.label].iloc[i + self.window : i + self.window + self.horizon].to_numpy()
            if np.isnan(target).any():
                rejected["missing label"] += 1
            elif self.nan_policy != "mask" and np.isnan(source.values).any():
                rejected["missing reading after imputation"] += 1
            else:
                pairs.append((source, [int(v) for v in target]))
        return Rows(split, pairs, rejected, self.path)

    def read_inputs(self, path: str) -> list[Window]:
        """Every complete window of a CSV with the feature columns (labels optional); gaps are skipped."""
        frame = self._prepare(read_daily_csv(path, self.date_column, self.features), path)
        starts, rejected = self._windows(frame, self.window, None)
        windows = [self._window(frame, i) for i in starts]
        incomplete = [w.end.date() for w in windows if np.isnan(w.values).any()]
        if incomplete and self.nan_policy != "mask":
            raise DataError(f"{path}: windows ending {incomplete[:5]} still miss readings after `nan_policy`")
        if not windows:
            raise DataError(f"{path}: no complete window of {self.window} consecutive days ({dict(rejected)})")
        return windows

    def report(self, translator: Translator, run_dir: Path) -> dict[str, float]:
        from seq2seq_plugins.series.report import report

        return report(translator, {split: self.read(split) for split in self.splits}, run_dir)

    def write_predictions(self, translator: Translator, sources: list[Window], out: TextIO) -> int:
        from seq2seq_plugins.series.report import write_predictions

        return write_predictions(translator, sources, out)
