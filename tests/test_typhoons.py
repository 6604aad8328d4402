"""Issue-level behaviour of the series domain: best-track labels, frequencies, known-future covariates, imbalance,
calibration, verification scores, backtests and predict's error reports."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from seq2seq import compose
from seq2seq.data import Batch
from seq2seq.embeddings import TokenEmbedding
from seq2seq.errors import ConfigError, DataError
from seq2seq.heads import LinearHead
from seq2seq.model import EncoderDecoder, ModelSpec
from seq2seq.module import Seq2SeqModule, token_weights
from seq2seq.training import fold_years
from seq2seq_plugins.series import LabelTokenizer, SeriesWindows, Standardizer, ValueEmbedding
from seq2seq_plugins.series.build_typhoons import activity, formations, labels
from seq2seq_plugins.series.report import bootstrap_bss, ece, fit_calibration

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


def _tiny_module(overrides: list[str]) -> tuple[Seq2SeqModule, Batch]:
    config = compose(["experiment=storm_onset", "model.d_model=16", "model.n_heads=2", "model.d_ff=32",
                      *overrides])
    tok = LabelTokenizer()
    tok.fit([[0, 1]])
    scaler = Standardizer()
    scaler.load_state_dict({"mean": [0.0, 0.0, 0.0, 0.0], "std": [1.0] * 4})
    module = Seq2SeqModule(config, {"src": scaler.state_dict(), "tgt": tok.state_dict()}).eval()  # no dropout
    torch.manual_seed(0)
    src = torch.randn(8, 5, 4)
    tgt = torch.randint(3, 5, (8, 3))
    tgt_in = torch.cat([torch.ones(8, 1, dtype=torch.long), tgt[:, :-1]], 1)  # BOS y1 y2
    return module, Batch(src, torch.ones(8, 5, dtype=torch.bool), tgt_in, tgt)


def test_token_weights_and_focal_loss_change_the_loss_as_configured():
    module, batch = _tiny_module([])
    plain = module.loss(batch)
    logits = module(batch).reshape(-1, 5)
    target = batch.tgt_out.reshape(-1)
    weighted = _tiny_module(["optim.token_weights={1:4.0}"])[0]
    keyed = _tiny_module(["optim.token_weights.1=4"])[0]
    assert weighted.config.optim.token_weights == keyed.config.optim.token_weights == {"1": 4.0}
    weighted.load_state_dict(module.state_dict())
    w = torch.tensor([1.0, 1, 1, 1, 4.0])  # label 1 is id 4
    expected = torch.nn.functional.cross_entropy(logits, target, weight=w)
    torch.testing.assert_close(weighted.loss(batch), expected)
    assert not torch.isclose(weighted.loss(batch), plain)
    focal = _tiny_module(["optim.focal_gamma=2.0"])[0]
    focal.load_state_dict(module.state_dict())
    p = logits.softmax(-1).gather(1, target[:, None])[:, 0]
    torch.testing.assert_close(focal.loss(batch), (-(1 - p) ** 2 * p.log()).mean())
    with pytest.raises(ConfigError, match=r"names \['7'\], which are not target tokens"):
        token_weights(module.tgt_tok, {"7": 2.0})
    with pytest.raises(ConfigError, match="do not combine"):
        compose(["experiment=storm_onset", "optim.focal_gamma=1", "optim.label_smoothing=0.1"])


def test_calibration_fitted_on_one_half_lowers_the_ece_of_the_other():
    rng = np.random.default_rng(0)
    p_true = rng.uniform(0, 0.3, 40000)
    y = rng.random(40000) < p_true
    logit = np.log(p_true / (1 - p_true))
    fit, held = slice(0, 20000), slice(20000, None)
    # overconfident log-odds (what temperature scaling undoes), and a distortion only isotonic regression undoes
    for kind, forecast in (("temperature", 1 / (1 + np.exp(-2.5 * logit))), ("isotonic", np.sqrt(p_true))):
        before = ece(forecast[held], y[held])
        assert before > 0.03
        calibrate = fit_calibration(kind, forecast[fit], y[fit])
        after = ece(calibrate(forecast[held]), y[held])
        assert after < before / 3, f"{kind}: ECE {before:.3f} -> {after:.3f}"


def test_the_year_bootstrap_interval_covers_the_known_skill():
    """Forecasts equal to the true probability p ~ U(0, 0.4) against climatology 0.2: the population Brier skill is
    1 - E[p(1-p)] / (Var p + E[p(1-p)]) = 1 - 0.14667 / 0.16 = 0.0833."""
    truth, covered = 1 - (0.2 - 0.16 / 3) / (0.16 / 12 + 0.2 - 0.16 / 3), 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        p = rng.uniform(0, 0.4, (30 * 365, 1))
        y = (rng.random(p.shape) < p).astype(float)
        low, high = bootstrap_bss(p, np.full_like(p, 0.2), y, np.repeat(np.arange(30), 365), n=500, seed=seed)
        covered += low <= truth <= high
        assert high - low < 0.1
    assert covered >= 16, f"covered the true skill {covered} times in 20"


def test_backtest_folds_end_with_the_last_year_and_never_train_or_validate_on_their_test_years():
    plans = fold_years((1976, 2021), {"val_from": 2006, "test_from": 2012}, 5, None, None)
    assert [p["test_from"] for p in plans] == [2012, 2014, 2016, 2018, 2020]
    assert all(p["test_to"] == p["test_from"] + 2 and p["val_from"] == p["test_from"] - 6 for p in plans)
    assert plans[-1]["test_to"] == 2022
    with pytest.raises(ConfigError, match="leaving no training years"):
        fold_years((2000, 2021), {"val_from": 2006, "test_from": 2012}, 5, 4, 6)
    with pytest.raises(ConfigError, match="lower `folds`"):
        fold_years((1976, 2021), {"val_from": 2006, "test_from": 2018}, 5, None, None)


def _recent(tmp_path: Path, frame: pd.DataFrame) -> Path:
    path = tmp_path / "recent.csv"
    frame.to_csv(path, index=False, date_format="%Y-%m-%d")
    return path


def test_predict_inputs_report_every_problem_of_a_covariate_file_by_line(tmp_path, caplog):
    reader = SeriesWindows(embedded="typhoons_ryukyu", features=["naha_tavg", "active", "developing"],
                           label="formation", window=5, horizon=2, future_calendar=True)
    recent = pd.read_csv(reader.path, dtype=str).query("date >= '2021-09-01'")[["date", "naha_tavg", "active",
                                                                                  "developing"]]
    good = _recent(tmp_path, recent)
    assert len(reader.read_inputs(str(good))) == len(recent) - 4
    bad = recent.copy()
    bad.iloc[3, 2] = "many"  # line 5
    bad.iloc[7, 0] = "2021-09-3x"  # line 9
    bad.iloc[10, 3] = "inf"  # line 12
    with pytest.raises(DataError) as err:
        reader.read_inputs(str(_recent(tmp_path, bad)))
    message = str(err.value)
    assert "3 problem(s)" in message and "unreadable `date`" in message and "on line 9" in message
    assert "`active` is not a finite number on line 5" in message and "`developing`" in message
    with pytest.raises(DataError, match=r"missing column\(s\) \['developing'\]"):
        reader.read_inputs(str(_recent(tmp_path, recent.drop(columns=["developing"]))))
    nan = recent.copy()
    nan.iloc[[2, 20], 2] = ""
    with pytest.raises(DataError, match=r"2 row\(s\) with a missing reading, on lines 4, 22"):
        reader.read_inputs(str(_recent(tmp_path, nan)))
    gap = recent.drop(index=recent.index[[10]])
    with caplog.at_level(logging.WARNING):
        windows = reader.read_inputs(str(_recent(tmp_path, gap)))
    assert len(windows) == len(gap) - 4 - 4  # the 4 windows over the missing date
    assert "skipped 4 of" in caplog.text and "window of lines 8-12: a gap in the dates" in caplog.text
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match="the file is empty"):
        reader.read_inputs(str(tmp_path / "empty.csv"))
    with pytest.raises(DataError, match=r"no complete window of 5 consecutive `D` steps \(the file has 3 row\(s\)\)"):
        reader.read_inputs(str(_recent(tmp_path, recent.head(3))))
    filled = SeriesWindows(embedded="typhoons_ryukyu", features=["naha_tavg", "active", "developing"],
                           label="formation", window=5, horizon=2, nan_policy="impute", impute_limit=1)
    long_gap = recent.copy()
    long_gap.iloc[10:13, 1] = ""  # 3 missing readings in a row, past impute_limit
    with caplog.at_level(logging.WARNING):
        windows = filled.read_inputs(str(_recent(tmp_path, long_gap)))
    assert "readings still missing on lines 12, 13, 14 after `data.nan_policy`" in caplog.text
    assert len(windows) == len(recent) - 4 - 7


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from seq2seq.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_predict_with_covariates_end_to_end(tmp_path):
    run = tmp_path / "run"
    trained = _cli("train", "experiment=typhoon_onset", "trainer.max_epochs=1", "trainer.limit_train_batches=5",
                   "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    columns = ["date", "ishigaki_tavg", "yonaguni_tavg", "miyako_tavg", "naha_tavg", "active", "developing"]
    recent = pd.read_csv(SeriesWindows(embedded="typhoons_ryukyu").path, dtype=str)[columns].tail(40)
    recent.to_csv(tmp_path / "recent.csv", index=False)
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    done = _cli("predict", ckpt, f"input={tmp_path / 'recent.csv'}", f"output={tmp_path / 'forecast.csv'}",
                f"hydra.run.dir={tmp_path / 'predict'}")
    assert done.returncode == 0, done.stderr[-3000:]
    forecast = pd.read_csv(tmp_path / "forecast.csv")
    assert len(forecast) == (40 - 30 + 1) * 7
    last = forecast.tail(7)
    assert (last["window_end"] == "2021-12-21").all() and last["lead_step"].tolist() == list(range(1, 8))
    assert last["date"].tolist() == [f"2021-12-{d}" for d in range(22, 29)]
    assert forecast["probability"].between(0, 1).all() and set(forecast["label"]) <= {0, 1}
    # calibrated on the validation years (the experiment's isotonic map: monotone in the raw probability), and
    # alerts at the validation years' CSI-best threshold
    ordered = forecast.sort_values("probability_raw")
    assert ordered["probability"].is_monotonic_increasing and forecast["probability_raw"].between(0, 1).all()
    assert forecast["threshold"].nunique() == 1 and 0 < forecast["threshold"].iloc[0] < 1
    assert (forecast["alert"] == (forecast["probability"] >= forecast["threshold"]).astype(int)).all()
    meta = json.loads((tmp_path / "forecast.csv.json").read_text())
    assert meta["checkpoint"].endswith("last.ckpt")

    bad = recent.copy()
    bad.iloc[4, 5] = "x"  # `active`, line 6
    bad.iloc[9, 6] = "nan?"  # `developing`, line 11
    bad.to_csv(tmp_path / "bad.csv", index=False)
    failed = _cli("predict", ckpt, f"input={tmp_path / 'bad.csv'}", f"hydra.run.dir={tmp_path / 'predict2'}")
    assert failed.returncode == 2
    assert "`active` is not a finite number on line 6" in failed.stderr
    assert "`developing` is not a finite number on line 11" in failed.stderr


@pytest.mark.slow
def test_backtest_trains_each_fold_on_the_years_before_its_block_and_pools_the_blocks(tmp_path):
    rng = np.random.default_rng(0)
    days = pd.date_range("2000-01-01", "2011-12-31", freq="D")
    active = (rng.random(len(days)) < 0.3).astype(int)
    frame = pd.DataFrame({"date": days, "t": rng.normal(size=len(days)).round(2), "active": active,
                          "formation": np.roll(active, 1) & (rng.random(len(days)) < 0.5)})
    path = tmp_path / "series.csv"
    frame.to_csv(path, index=False)
    config = compose(["experiment=typhoon_onset", f"data.path={path}", "data.features=[t,active]",
                      "data.val_from=2006", "data.test_from=2008", "folds=2", "trainer.max_epochs=1",
                      "trainer.limit_train_batches=3", "trainer.enable_progress_bar=false"], command="backtest")
    from seq2seq.training import backtest

    results = backtest(config, tmp_path / "bt")
    assert [(f["val_from"], f["test_from"], f["test_to"]) for f in results["folds"]] == [(2006, 2008, 2010),
                                                                                         (2008, 2010, 2012)]
    pooled_years = []
    for fold in results["folds"]:
        fold_dir = tmp_path / "bt" / f"fold-{fold['fold']}"
        saved = np.load(fold_dir / "series_test.npz")
        assert fold["test_from"] <= saved["years"].min() and saved["years"].max() < fold["test_to"]
        report = json.loads((fold_dir / "data_report.json").read_text())
        # training read exactly the CSV rows before its validation years, and nothing after
        assert report["train"]["lines_read"] == int((days.year < fold["val_from"]).sum())
        pooled_years.append(saved["years"])
    assert "test/lead1/auroc" in results["pooled"] and "test/logistic/bss_climatology_low" in results["pooled"]
    assert (tmp_path / "bt" / "plots" / "backtest_folds.png").is_file()
    assert json.loads((tmp_path / "bt" / "backtest.json").read_text())["pooled"] == results["pooled"]


def test_backtest_refuses_a_reader_that_does_not_split_by_year(tmp_path):
    from seq2seq.training import backtest

    config = compose(["experiment=reverse", "folds=2"], command="backtest")
    with pytest.raises(ConfigError, match="does not split by year"):
        backtest(config, tmp_path / "bt")
    assert not (tmp_path / "bt").exists()


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
