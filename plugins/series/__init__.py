"""Numeric series -> labels: a window of W steps of readings -> one label per step of the horizon that follows.

Contract. A raw source is a `Window`: W consecutive steps (of `data.freq`: hourly, daily, weekly, monthly, ...) of F
features, the step it ends on, the labels observed over those steps (baselines use them; the model does not), the
forecast dates, and, with `future_calendar`, the known-future covariates of each forecast step (its calendar). A
raw target is the list of the next H labels. The `standardize` encoder scales sources with statistics of the
training windows only and appends the known-future rows (the core feeds them to the decoder, step by step); the
`labels` tokenizer maps label values to ids and names them (`label_ids`), so the core decodes nothing but labels;
the `linear` embedding maps F values to d_model.

Data: a wide CSV, one row per step: a date column, then any number of numeric columns. `features` picks the
inputs: readings of several stations, and observed covariates known at forecast time (the count of active
tropical systems, say), are all just features. Several series can train one model: `series_column` names the
column that tells them apart (rows of one series need not be contiguous; windows never mix series), and `static`
lists covariates that hold one value per series (a station's latitude), appended to every step (and, with
`future_calendar`, to the known-future rows). Embedded sets (`data/README.md`): `typhoons_ryukyu` (Ryukyu Islands
temperatures + JTWC Western North Pacific best track) and `clemson_storms` (Clemson, SC + Atlantic storms).

Rows are read as text and checked, every problem at once: a bad date, number or label, a repeated date or a date off
the `freq` grid is an error naming its CSV lines. Missing readings follow `nan_policy`: `error` (default; names the
lines), `impute` (`impute_method` ffill or linear interpolation, across at most `impute_limit` consecutive missing
steps), or `mask` (kept; the encoder then needs `mask_missing: true`, which zeroes them and adds indicator
features). The report scores the model against climatology, persistence and logistic regression
(`report.py`); `calibration` (none, temperature, isotonic) adds the model's probabilities calibrated on the
validation windows. Windows are rejected, and counted, when they straddle a gap in the dates, cross a split boundary, or
(after imputation) still miss a reading or a label. Splits are by year, so no window sees the future of another
split.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from seq2seq.domain import Decodes, Reader, Rows
from seq2seq.errors import ConfigError, DataError
from seq2seq.registry import DATASETS
from seq2seq.schema import one_of
from seq2seq_plugins.series.components import (  # noqa: F401 - importing registers them; tests import them here
    LabelTokenizer,
    Standardizer,
    ValueEmbedding,
    Window,
)
from seq2seq_plugins.series.readings import calendar, calendar_names, numbered, offset_of, read_series_csv

DATA_DIR = Path(__file__).parent / "data"
EMBEDDED = ("typhoons_ryukyu", "clemson_storms")  # CSVs in DATA_DIR
NAN_POLICIES = ("error", "impute", "mask")
IMPUTE_METHODS = ("ffill", "interpolate")
CALIBRATIONS = ("none", "temperature", "isotonic")

log = logging.getLogger(__name__)


@DATASETS.register("windows")
class SeriesWindows(Reader):
    """Windows of `window` steps of `freq` -> labels of the next `horizon` steps, split by year (`val_from`,
    `test_from`, and `test_to`, exclusive, for rolling-origin backtests)."""

    def __init__(  # noqa: PLR0913 - flat options are the schema of the `data:` block
        self,
        path: str | None = None,
        embedded: str = "clemson_storms",
        features: list[str] | None = None,
        static: list[str] | None = None,
        series_column: str | None = None,
        label: str = "onset",
        date_column: str = "date",
        freq: str = "D",
        window: int = 30,
        horizon: int = 7,
        stride: int = 1,
        calendar: bool = True,
        future_calendar: bool = False,
        nan_policy: str = "error",
        impute_method: str = "ffill",
        impute_limit: int = 3,
        val_from: int = 2010,
        test_from: int = 2015,
        test_to: int | None = None,
        calibration: str = "none",
    ) -> None:
        for key, value, choices in (("calibration", calibration, CALIBRATIONS),
                                    ("nan_policy", nan_policy, NAN_POLICIES),
                                    ("impute_method", impute_method, IMPUTE_METHODS), ("embedded", embedded, EMBEDDED)):
            one_of(f"data.{key}", value, choices)
        if min(window, horizon, stride) < 1:
            raise ConfigError("`data.window`, `data.horizon` and `data.stride` must be positive")
        if not val_from <= test_from < (test_to if test_to is not None else test_from + 1):
            raise ConfigError(f"need `data.val_from` ({val_from}) <= `data.test_from` ({test_from}) < "
                              f"`data.test_to` ({test_to})")
        if future_calendar and not calendar:
            raise ConfigError("`data.future_calendar=true` feeds the calendar of forecast steps to the decoder and "
                              "needs the calendar among the inputs: set `data.calendar=true`")
        self.offset = offset_of(freq)
        self.path = path or str(DATA_DIR / f"{embedded}.csv")
        self.features = features or ["tmin", "tmax"]
        self.static, self.series_column = list(static or []), series_column
        if self.static and not series_column:
            raise ConfigError("`data.static` columns hold one value per series: name the series with "
                              "`data.series_column`")
        self.label, self.date_column, self.freq = label, date_column, freq
        self.window, self.horizon, self.stride = window, horizon, stride
        self.calendar, self.future_calendar = calendar, future_calendar
        self.nan_policy, self.impute_method, self.impute_limit = nan_policy, impute_method, impute_limit
        self.bounds = {"train": (None, val_from), "val": (val_from, test_from), "test": (test_from, test_to)}
        self.calibration = calibration
        probe = pd.date_range("2000-01-01", periods=2, freq=self.offset)
        self.sub_daily = bool(probe[1] - probe[0] < pd.Timedelta(days=1))
        self._frame: pd.DataFrame | None = None

    @property
    def columns(self) -> list[str]:
        return self.features + self.static + (list(calendar_names(self.sub_daily)) if self.calendar else [])

    def _prepare(self, frame: pd.DataFrame, path: str) -> pd.DataFrame:
        """Apply the NaN policy to the readings and add calendar features."""
        gaps = frame[self.features + self.static].isna().any(axis=1)
        if gaps.any() and self.nan_policy == "error":
            raise DataError(f"{path}: {int(gaps.sum())} row(s) with a missing reading, on "
                            f"{numbered(sorted(frame['line'][gaps]))}; set "
                            "`data.nan_policy=impute` (forward-fill) or `mask`")
        if self.nan_policy == "impute":
            # A run is consecutive rows, on the grid too: nothing is carried across a gap in the dates.
            run_id = ((frame["step"].diff() != 1) | (frame["series"] != frame["series"].shift())).cumsum()
            for c in self.features:
                col = frame[c]
                groups = col.groupby(run_id)
                filled = groups.ffill() if self.impute_method == "ffill" else groups.transform(
                    lambda s: s.interpolate(limit_area="inside"))
                missing_run = col.isna().groupby([run_id, col.notna().cumsum()]).transform("sum")
                frame[c] = filled.where(col.notna() | (missing_run <= self.impute_limit))  # longer runs stay
        if self.calendar:
            frame = frame.assign(**calendar(pd.DatetimeIndex(frame["date"]), self.sub_daily))
        return frame

    def frame(self) -> pd.DataFrame:
        if self._frame is None:
            self.files()  # a missing file is a DataError naming it
            frame = read_series_csv(self.path, self.date_column, [*self.features, *self.static, self.label],
                                    self.freq, series_column=self.series_column, static=self.static)
            self._frame = self._prepare(frame, self.path)
        return self._frame

    def _windows(self, frame: pd.DataFrame, span: int, split: str | None) -> tuple[list[int], Counter[str]]:
        """Start rows of complete windows of `span` steps, and rejections, among windows starting in `split`'s
        years. A window that starts in one split and ends in the next is rejected (and counted) by the split it
        starts in."""
        steps, years = frame["step"].to_numpy(), frame["date"].dt.year.to_numpy()
        series = frame["series"].to_numpy()
        lo, hi = self.bounds[split] if split else (None, None)
        starts, rejected = [], Counter()
        for i in range(0, len(frame) - span + 1, self.stride):
            if (lo is not None and years[i] < lo) or (hi is not None and years[i] >= hi):
                continue  # starts in another split
            if series[i] != series[i + span - 1]:
                continue  # runs into the next series: not a window of either
            if steps[i + span - 1] - steps[i] != span - 1:
                rejected["straddles a gap in the dates"] += 1
            elif hi is not None and years[i + span - 1] >= hi:
                rejected["crosses a split boundary"] += 1
            else:
                starts.append(i)
        return starts, rejected

    def _arrays(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The frame's inputs (N, F), labels (N,) (NaN when absent), series (N,), and which columns are known
        ahead (F,): with `future_calendar`, the calendar and the static covariates."""
        values = frame[self.columns].to_numpy(np.float32)
        labels = frame[self.label].to_numpy(float) if self.label in frame else np.full(len(frame), np.nan)
        ahead = {*calendar_names(self.sub_daily), *self.static}
        known = np.array([self.future_calendar and c in ahead for c in self.columns])
        return values, labels, frame["series"].to_numpy(), known

    def _window(self, arrays: tuple[np.ndarray, ...], i: int, end: pd.Timestamp, ahead: pd.DatetimeIndex,
                rows_follow: bool = False) -> Window:
        """The window of rows i.. ; `rows_follow`: the frame's next rows are the forecast steps (training)."""
        values, labels, series, known = arrays
        past = values[i : i + self.window]
        future = None
        if known.any():  # the forecast steps' calendar and static covariates
            future = np.full((len(ahead), len(self.columns)), np.nan, dtype=np.float32)
            if rows_follow:
                future[:, known] = values[i + self.window : i + self.window + len(ahead)][:, known]
            else:
                cal = calendar(ahead, self.sub_daily)
                for j in np.flatnonzero(known):
                    future[:, j] = cal[self.columns[j]] if self.columns[j] in cal else past[-1, j]
        return Window(past, end, labels[i : i + self.window], ahead, future, str(series[i]))

    def files(self) -> list[str]:
        if not Path(self.path).is_file():
            raise DataError(f"{self.path}: no such file; set `data.path`")
        return [self.path]

    def stream(self, splits: Collection[str]) -> Iterator[Rows]:
        for split in (s for s in self.splits if s in splits):
            yield self._rows(split)

    def _in_split(self, frame: pd.DataFrame, split: str) -> int:
        lo, hi = self.bounds[split]
        years = frame["date"].dt.year
        return int(((years >= (lo or years.min())) & (years < (hi or years.max() + 1))).sum())

    def _rows(self, split: str) -> Rows:
        frame = self.frame()
        starts, rejected = self._windows(frame, self.window + self.horizon, split)
        pairs, dates, arrays = [], pd.DatetimeIndex(frame["date"]), self._arrays(frame)
        for i in starts:
            end = i + self.window
            target = arrays[1][end : end + self.horizon]
            source = self._window(arrays, i, dates[end - 1], dates[end : end + self.horizon], rows_follow=True)
            if np.isnan(target).any():
                rejected["missing label"] += 1
            elif self.nan_policy != "mask" and np.isnan(source.values).any():
                rejected["missing reading after imputation"] += 1
            else:
                pairs.append((source, [int(v) for v in target]))
        rows = self._in_split(frame, split)
        if not pairs:
            span = self.window + self.horizon
            why = (f"its {rows} row(s) in those years are fewer than the {span} one window needs" if rows < span
                   else f"its {rows} rows there make only rejected windows: {dict(rejected)}")
            raise DataError(f"{self.path}: no {split} window of {self.window} + {self.horizon} consecutive "
                            f"`{self.freq}` steps in its years {self.bounds[split]}: {why}. Check `data.freq`, "
                            "`data.window`, `data.horizon` and the split years")
        return Rows(split, pairs, rejected, self.path, lines=rows)

    def write_sample(self, folder: Path) -> tuple[dict[str, Any], dict[str, int]]:
        """Three years of random readings in a CSV with this reader's columns, a few readings missing."""
        dates = pd.date_range("2001-01-01", "2004-01-01", freq=self.freq, inclusive="left")
        rng = np.random.default_rng(0)
        frame = pd.DataFrame({self.date_column: dates.strftime("%Y-%m-%d %H:%M:%S")})
        for column in [*self.features, *self.static]:
            frame[column] = rng.normal(size=len(dates)) if column in self.features else 1.0
        frame.loc[[40, 41, 400], self.features[0]] = np.nan  # gaps a window must not cross unless imputed
        frame[self.label] = rng.integers(0, 2, size=len(dates))
        if self.series_column:
            frame[self.series_column] = "a"
        path = folder / "sample.csv"
        frame.to_csv(path, index=False)
        per_year = {year: int((dates.year == year).sum()) for year in (2001, 2002, 2003)}
        options = {"path": str(path), "val_from": 2002, "test_from": 2003, "test_to": None}
        return options, {"train": per_year[2001], "val": per_year[2002], "test": per_year[2003]}

    def target_length(self) -> int:
        return self.horizon

    def read_inputs(self, path: str) -> list[Window]:
        """Every complete window of a CSV with the feature columns (labels optional). Problems of the file are one
        DataError naming every line; windows left out (a gap in the dates, readings still missing after
        `nan_policy`) are logged with their CSV lines."""
        frame = read_series_csv(path, self.date_column, [*self.features, *self.static], self.freq,
                                series_column=self.series_column, static=self.static)
        frame = self._prepare(frame, path)
        lines_of, steps = frame["line"].to_numpy(), frame["step"].to_numpy()
        windows, skipped, arrays, dates = [], [], self._arrays(frame), pd.DatetimeIndex(frame["date"])
        readings = frame[self.features + self.static].isna().to_numpy()  # (N, F) still missing
        for i in range(0, len(frame) - self.window + 1, self.stride):
            last = i + self.window - 1
            where = f"window of lines {lines_of[i]}-{lines_of[last]}"
            missing_rows = readings[i : last + 1].any(axis=1)
            if steps[last] - steps[i] != self.window - 1:
                skipped.append(f"{where}: a gap in the dates")
            elif self.nan_policy != "mask" and missing_rows.any():
                missing = lines_of[i : last + 1][missing_rows]
                skipped.append(f"{where}: readings still missing on {numbered(missing.tolist())} after "
                               "`data.nan_policy`")
            else:
                ahead = pd.date_range(dates[last], periods=self.horizon + 1, freq=self.offset)[1:]
                windows.append(self._window(arrays, i, dates[last], ahead))
        if skipped:
            shown = skipped[:10] + ([f"... and {len(skipped) - 10} more"] if len(skipped) > 10 else [])
            log.warning("%s: skipped %d of %d windows:\n  %s", path, len(skipped), len(skipped) + len(windows),
                        "\n  ".join(shown))
        if not windows:
            reason = "; ".join(skipped[:3]) if skipped else f"the file has {len(frame)} row(s)"
            raise DataError(f"{path}: no complete window of {self.window} consecutive `{self.freq}` steps "
                            f"({reason})")
        return windows

    def year_span(self) -> tuple[int, int]:
        years = self.frame()["date"].dt.year
        return int(years.min()), int(years.max())

    def backtest_report(self, fold_dirs: list[Path], run_dir: Path) -> dict[str, float]:
        from seq2seq_plugins.series.report import pooled_report

        return pooled_report(fold_dirs, run_dir)

    def report(self, translator: Decodes, run_dir: Path) -> dict[str, float]:
        from seq2seq_plugins.series.report import report

        return report(translator, {split: self.read(split) for split in self.splits}, run_dir, self.calibration)

    def write_predictions(self, translator: Decodes, sources: list[Window], out: TextIO) -> int:
        """Probabilities per lead step; where the training data can still be read, also calibrated ones (with
        `calibration`) and alerts at the validation years' CSI-best threshold, both fitted on the validation
        windows, as the report does."""
        from seq2seq_plugins.series.report import write_predictions

        try:
            val = self.read("val")
        except DataError as err:
            log.warning("predictions without calibration or alerts: the validation data cannot be read (%s)", err)
            val = None
        return write_predictions(translator, sources, out, val, self.calibration)
