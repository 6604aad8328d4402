"""Reading a series CSV: every cell parsed and checked, every problem named by its CSV line; the frequency grid;
calendar covariates."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import numpy as np
import pandas as pd

from seq2seq.errors import ConfigError, DataError, some


def numbered(numbers: Collection[int]) -> str:
    """'lines 6, 11' (the first few of them, and how many more)."""
    numbers = list(numbers)
    return f"line{'s' if len(numbers) > 1 else ''} {some(numbers)}"


def lines(mask: pd.Series | np.ndarray) -> str:
    """The CSV lines (header = line 1) of the rows, in file order, where `mask` is True."""
    return numbered((np.flatnonzero(np.asarray(mask)) + 2).tolist())


def offset_of(freq: str) -> pd.DateOffset:
    try:
        return pd.tseries.frequencies.to_offset(freq)
    except ValueError as e:
        raise ConfigError(f"`data.freq` {freq!r} is not a pandas offset alias (h, D, W, MS, ...): {e}") from None


def calendar_names(sub_daily: bool) -> tuple[str, ...]:
    return ("doy_sin", "doy_cos", "hod_sin", "hod_cos") if sub_daily else ("doy_sin", "doy_cos")


def calendar(dates: pd.DatetimeIndex, sub_daily: bool) -> dict[str, np.ndarray]:
    """Day of year (and, for sub-daily series, hour of day) as sine/cosine pairs."""
    angle = 2 * np.pi * dates.day_of_year.to_numpy() / 365.25
    out = {"doy_sin": np.sin(angle), "doy_cos": np.cos(angle)}
    if sub_daily:
        hour = 2 * np.pi * (dates.hour.to_numpy() + dates.minute.to_numpy() / 60) / 24
        out |= {"hod_sin": np.sin(hour), "hod_cos": np.cos(hour)}
    return out


def read_series_csv(path: str | Path, date_column: str, columns: list[str], freq: str = "D",
                    optional: Collection[str] = (), series_column: str | None = None,
                    static: Collection[str] = ()) -> pd.DataFrame:
    """Read a wide CSV as text, then parse and check all of it; one DataError lists every problem with its CSV
    lines. Returns the frame sorted by series and date, with the CSV `line` of each row, its `series` ('' without
    `series_column`) and `step` (its index on its series' `freq` grid). `optional` columns may be absent (labels,
    for prediction); `static` columns must hold one value per series."""
    try:
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False, skip_blank_lines=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: the file is empty; want a header line naming `{date_column}` and "
                        f"{columns}, then one row per step") from None
    if raw.empty:
        raise DataError(f"{path}: a header and no rows; want one row per step")
    keys = [date_column, *([series_column] if series_column else [])]
    absent = [c for c in [*keys, *columns] if c not in raw.columns and c not in optional]
    problems = [f"missing column(s) {absent}; the header has {list(raw.columns)}"] if absent else []
    if any(c not in raw.columns for c in keys):
        raise DataError(f"{path}: " + "; ".join(problems))
    frame, found = _parse(raw, date_column, [c for c in columns if c in raw.columns], series_column)
    problems += found
    for c in (c for c in static if c in frame):
        usual = frame.groupby("series")[c].transform(lambda v: v.mode().iloc[0] if v.notna().any() else np.nan)
        changes = frame[c].notna() & (frame[c] != usual)  # the lines that differ from their series' usual value
        if changes.any():
            problems.append(f"static column `{c}` changes within a series on {lines(changes)}")
    dated = frame.dropna(subset=["date"]).sort_values(["series", "date"], kind="stable")
    steps = []
    for _, rows in dated.groupby("series", sort=False):
        grid = pd.date_range(rows["date"].iloc[0], rows["date"].iloc[-1], freq=offset_of(freq))
        step = grid.get_indexer(rows["date"])
        if (step < 0).any():
            off = frame["line"].isin(rows["line"][step < 0])
            problems.append(f"dates off the `data.freq={freq}` grid starting {grid[0]} on {lines(off)}; set "
                            "`data.freq` to the series' frequency")
        steps.append(step)
    if problems:
        raise DataError(f"{path}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    return dated.assign(step=np.concatenate(steps) if steps else []).reset_index(drop=True)


def _parse(raw: pd.DataFrame, date_column: str, columns: list[str], series_column: str | None
           ) -> tuple[pd.DataFrame, list[str]]:
    """The text columns parsed, with each row's CSV `line` and `series`, and the problems found, by line."""
    problems = []
    frame = pd.DataFrame({"date": pd.to_datetime(raw[date_column].str.strip(), errors="coerce", format="ISO8601"),
                          "series": raw[series_column].str.strip() if series_column else ""})
    if series_column and (frame["series"] == "").any():
        problems.append(f"empty `{series_column}` on {lines(frame['series'] == '')}")
    if frame["date"].isna().any():
        problems.append(f"unreadable `{date_column}` (want YYYY-MM-DD, or ISO 8601 with a time) on "
                        f"{lines(frame['date'].isna())}")
    for c in columns:
        text = raw[c].str.strip()
        frame[c] = pd.to_numeric(text.replace("", np.nan), errors="coerce")
        bad = frame[c].isna() & (text != "") | np.isinf(frame[c])
        if bad.any():
            problems.append(f"column `{c}` is not a finite number on {lines(bad)}")
    repeated = frame.duplicated(["series", "date"], keep=False) & frame["date"].notna()
    if repeated.any():
        problems.append(f"repeated dates{' within a series' if series_column else ''} on {lines(repeated)}")
    frame["line"] = np.arange(2, len(frame) + 2)
    return frame, problems
