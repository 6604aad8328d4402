"""The series domain's forecasts: imbalance (token weights, focal loss), calibration, verification scores,
backtests and predict's error reports."""

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli

from seq2seq import compose
from seq2seq.data import Batch
from seq2seq.errors import ConfigError, DataError
from seq2seq.module import Seq2SeqModule, token_weights
from seq2seq.training import fold_years
from seq2seq_plugins.series import LabelTokenizer, SeriesWindows, Standardizer
from seq2seq_plugins.series.report import bootstrap_bss, ece, fit_calibration

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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


@pytest.mark.slow
def test_predict_with_covariates_end_to_end(tmp_path):
    run = tmp_path / "run"
    trained = cli("train", "experiment=typhoon_onset", "trainer.max_epochs=1", "trainer.limit_train_batches=5",
                   "trainer.limit_val_batches=2", "trainer.enable_progress_bar=false", f"hydra.run.dir={run}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    columns = ["date", "ishigaki_tavg", "yonaguni_tavg", "miyako_tavg", "naha_tavg", "active", "developing"]
    recent = pd.read_csv(SeriesWindows(embedded="typhoons_ryukyu").path, dtype=str)[columns].tail(40)
    recent.to_csv(tmp_path / "recent.csv", index=False)
    ckpt = f"ckpt={run / 'checkpoints' / 'last.ckpt'}"
    done = cli("predict", ckpt, f"input={tmp_path / 'recent.csv'}", f"output={tmp_path / 'forecast.csv'}",
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
    failed = cli("predict", ckpt, f"input={tmp_path / 'bad.csv'}", f"hydra.run.dir={tmp_path / 'predict2'}")
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
