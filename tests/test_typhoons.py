"""The series domain's data: best-track labels, window frequencies, known-future covariates, several series and
static covariates."""


import numpy as np
import pandas as pd
import pytest
import torch

from seq2seq import compose
from seq2seq.embeddings import TokenEmbedding
from seq2seq.errors import ConfigError, DataError
from seq2seq.heads import LinearHead
from seq2seq.model import EncoderDecoder, ModelSpec
from seq2seq.module import Seq2SeqModule
from seq2seq_plugins.series import SeriesWindows, ValueEmbedding
from seq2seq_plugins.series.build_typhoons import activity, formations, labels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _fixes(rows: list[tuple[str, str, int, float, float, float]]) -> pd.DataFrame:
    """Best-track fixes: (SN, YYYY-MM-DD, hour, lat, lon, kt)."""
    frame = pd.DataFrame(rows, columns=["SN", "day", "Hour", "Lat", "Lon", "VMax"])
    frame["date"] = pd.to_datetime(frame["day"])
    frame["time"] = frame["date"] + pd.to_timedelta(frame["Hour"], unit="h")
    return frame.sort_values(["SN", "time"]).reset_index(drop=True)


def test_formation_is_the_first_fix_at_35_kt_in_the_basin_and_the_box_is_where_it_lies():
    fixes = _fixes([
        ("A", "2000-07-01", 0, 12.0, 130.0, 25), ("A", "2000-07-01", 18, 12.5, 129.0, 34),  # 34 kt: not yet
        ("A", "2000-07-02", 6, 13.0, 128.0, 35), ("A", "2000-07-03", 0, 14.0, 127.0, 60),   # forms on the 2nd, in PAR
        ("B", "2000-07-02", 0, 15.0, 140.0, 30), ("B", "2000-07-03", 0, 16.0, 141.0, 30),   # never forms
        ("C", "2000-07-04", 0, 10.0, 95.0, 40), ("C", "2000-07-05", 12, 11.0, 101.0, 45),   # 95°E is outside
        ("D", "2000-07-05", 0, 27.0, 125.0, 35),                                             # north of the box
    ])
    first = formations(fixes).set_index("SN")
    assert set(first.index) == {"A", "C", "D"}
    assert first.loc["A", "date"] == pd.Timestamp("2000-07-02") and first.loc["A", "par"]
    assert first.loc["C", "date"] == pd.Timestamp("2000-07-05") and not first.loc["C", "par"]
    assert not first.loc["D", "par"]
    days = pd.date_range("2000-07-01", "2000-07-06", name="date")
    got = labels(fixes, days)
    assert got["formation"].tolist() == [0, 1, 0, 0, 1, 0]  # C and D both on the 5th: one formation day
    assert got["formation_par"].tolist() == [0, 1, 0, 0, 0, 0]
    busy = activity(fixes, days)
    assert busy["active"].tolist() == [1, 2, 2, 1, 2, 0]
    # developing: active and not yet formed (A on the 1st; B throughout; C on the 4th)
    assert busy["developing"].tolist() == [1, 1, 1, 1, 0, 0]


def _series(freq: str, n: int, start: str = "2000-01-02", seed: int = 0, **columns) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"date": pd.date_range(start, periods=n, freq=freq), "x": rng.normal(size=n).round(3),
                         "y": rng.integers(0, 2, n), **columns})


@pytest.mark.parametrize("freq", ["h", "W", "MS"])
def test_windows_follow_the_series_own_frequency(freq, tmp_path):
    frame = _series(freq, 60)
    frame = frame.drop(index=[30]).reset_index(drop=True)  # one step missing
    path = tmp_path / "s.csv"
    frame.to_csv(path, index=False)
    reader = SeriesWindows(path=str(path), features=["x"], label="y", freq=freq, window=4, horizon=2,
                           future_calendar=True, val_from=2100, test_from=2101)
    split = reader.read("train")
    assert split.rejected == {"straddles a gap in the dates": 5}  # the windows of 6 steps over the missing one
    window = split.pairs[0][0]
    step = pd.tseries.frequencies.to_offset(freq)
    assert window.end == frame["date"][3] and list(window.ahead) == [window.end + step, window.end + 2 * step]
    names = reader.columns
    assert ("hod_sin" in names) == (freq == "h")
    assert window.future.shape == (2, len(names)) and np.isnan(window.future[:, 0]).all()  # x is not known ahead
    # the forecast steps' own calendar
    doy = window.ahead.day_of_year.to_numpy()
    np.testing.assert_allclose(window.future[:, names.index("doy_sin")], np.sin(2 * np.pi * doy / 365.25), atol=1e-6)
    # a daily reader on this file names the lines off its grid instead of dropping windows
    daily = SeriesWindows(path=str(path), features=["x"], label="y", window=4, horizon=2)
    expected = r"dates off the `data.freq=D` grid" if freq == "h" else r"no train window .* Check `data.freq`"
    with pytest.raises(DataError, match=expected):
        daily.read("train")


def test_no_window_left_is_a_data_error_and_the_report_counts_lines_and_windows(tmp_path):
    path = tmp_path / "m.csv"
    _series("MS", 30).to_csv(path, index=False)
    with pytest.raises(DataError, match=r"no train window of 30 \+ 7 consecutive `MS` steps"):
        SeriesWindows(path=str(path), features=["x"], label="y", freq="MS", val_from=2100, test_from=2101
                      ).read("train")
    rows = next(SeriesWindows(path=str(path), features=["x"], label="y", freq="MS", window=3, horizon=1,
                              val_from=2100, test_from=2101).stream(["train"]))
    assert rows.lines_read == 30 and rows.examples_read == 30 - 4 + 1


def test_known_future_rows_reach_the_decoder_at_their_own_step_and_not_before():
    torch.manual_seed(0)
    spec = ModelSpec(d_model=32, n_heads=4, n_encoder_layers=1, n_decoder_layers=2, d_ff=64, dropout=0.0,
                     max_positions=32)
    F, H = 3, 4
    model = EncoderDecoder(spec, ValueEmbedding(F, 32), TokenEmbedding(5, 32, 0), LinearHead(32, 5),
                           future_steps=H, n_features=F).eval()
    src = torch.randn(2, 10 + H, F)
    keep = torch.ones(2, 10 + H, dtype=torch.bool)
    tgt_in = torch.randint(3, 5, (2, H))
    base = model(src, keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool))
    for k in range(H):
        moved = src.clone()
        moved[:, 10 + k] += 1.0  # another date for forecast step k + 1
        out = model(moved, keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool))
        change = (out - base).abs().amax(dim=(0, 2))  # per position
        assert change[k] > 0.05, f"step {k + 1} did not see its own covariates"
        assert not k or change[:k].max() < 1e-6, "an earlier step saw a later step's covariates"
    # incremental decoding sees them too: cached greedy steps equal the teacher-forced pass
    memory = model.encode(src, keep)
    state = model.start_decoding(memory, keep, H, beam=1)
    stepped = torch.stack([model.decode_step(tgt_in[:, t], state) for t in range(H)], dim=1)
    torch.testing.assert_close(stepped, base, atol=1e-5, rtol=1e-5)
    # and the encoder never reads them: changing them leaves the memory of the past unchanged
    moved = src.clone()
    moved[:, 10:] = 5.0
    torch.testing.assert_close(model.encode(moved, keep)[:, :10], memory[:, :10])


def test_several_series_train_one_model_with_static_covariates_and_never_mix(tmp_path):
    rng = np.random.default_rng(0)
    days = pd.date_range("2000-01-01", periods=20, freq="D")
    stations = {"naha": 26.2, "ishigaki": 24.3}
    frame = pd.concat([pd.DataFrame({"station": name, "date": days, "lat": lat, "x": rng.normal(size=20).round(2),
                                     "y": rng.integers(0, 2, 20)}) for name, lat in stations.items()])
    frame = frame.sample(frac=1, random_state=0)  # rows of a series need not be contiguous
    path = tmp_path / "long.csv"
    frame.to_csv(path, index=False, date_format="%Y-%m-%d")
    reader = SeriesWindows(path=str(path), features=["x"], static=["lat"], series_column="station", label="y",
                           window=5, horizon=2, future_calendar=True, val_from=2100, test_from=2101)
    pairs = reader.read("train").pairs
    assert len(pairs) == 2 * (20 - 7 + 1)  # per series; none across the two
    for window, _ in pairs:
        assert window.series in stations
        lat = reader.columns.index("lat")
        assert (window.values[:, lat] == stations[window.series]).all()
        assert (window.future[:, lat] == stations[window.series]).all()  # a static covariate is known ahead
    inputs = reader.read_inputs(str(path))
    assert sorted({w.series for w in inputs}) == sorted(stations) and len(inputs) == 2 * 16
    frame.iloc[3, frame.columns.get_loc("lat")] = 99.0  # a static value that changes within its series
    frame = pd.concat([frame, frame.iloc[[7]]])  # and a date repeated within its series, on the last line
    frame.to_csv(path, index=False, date_format="%Y-%m-%d")
    with pytest.raises(DataError) as err:
        reader.read_inputs(str(path))
    assert "static column `lat` changes within a series on line 5" in str(err.value)
    assert f"repeated dates within a series on lines 9, {len(frame) + 1}" in str(err.value)
    with pytest.raises(ConfigError, match="name the series with `data.series_column`"):
        SeriesWindows(path=str(path), features=["x"], static=["lat"])


def test_only_a_feature_encoder_can_declare_known_future_rows():
    from seq2seq.build import build_model, fit_tokenizers
    from seq2seq.registry import DATASETS

    config = compose(["experiment=reverse", "model=tiny"])
    pairs = DATASETS.build(config.data, "data").read("train").pairs[:64]
    module = Seq2SeqModule(config, fit_tokenizers(config, pairs))
    module.src_tok.future_steps = 2  # a token source claiming known-future rows
    with pytest.raises(ConfigError, match=r"declares known-future rows, which only a FeatureEncoder"):
        build_model(config, module.src_tok, module.tgt_tok)
