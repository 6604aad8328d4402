from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from seq2seq import Translator, compose, train
from seq2seq.build import fit_tokenizers
from seq2seq.errors import DataError
from seq2seq.module import Seq2SeqModule
from seq2seq_plugins.series import LabelTokenizer, SeriesWindows, Standardizer
from seq2seq_plugins.series.report import scores


def _csv(path: Path, frame: pd.DataFrame) -> str:
    frame.to_csv(path, index=False, date_format="%Y-%m-%d")
    return str(path)


def _frame(days: int, start: str = "2000-01-01", seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"date": pd.date_range(start, periods=days, freq="D"),
                         "x": rng.normal(size=days).round(3), "y": rng.integers(0, 2, days)})


def test_windowing_counts_gaps_split_boundaries_and_missing_labels(tmp_path):
    frame = _frame(40)  # 2000-01-01 .. 2000-02-09
    frame = frame.drop(index=[20]).reset_index(drop=True)  # a gap on 2000-01-21
    frame.loc[30, "y"] = np.nan  # a missing label
    reader = SeriesWindows(path=_csv(tmp_path / "d.csv", frame), features=["x"], label="y", window=5, horizon=2,
                          calendar=False, val_from=2001, test_from=2002)
    train = reader.read("train")
    # 39 rows -> 33 windows of 7 days; 6 straddle the gap (they start on rows 14-19), 2 hold the missing label.
    assert train.examples_read == 33
    assert dict(train.rejected) == {"straddles a gap in the dates": 6, "missing label": 2}
    assert len(train.pairs) == 33 - 8
    assert all(len(w.values) == 5 and len(t) == 2 for w, t in train.pairs)


def test_a_window_crossing_a_split_boundary_is_rejected_once(tmp_path):
    path = _csv(tmp_path / "d.csv", _frame(20, start="2000-12-20"))
    reader = SeriesWindows(path=path, features=["x"], label="y", window=3, horizon=1, calendar=False,
                          val_from=2001, test_from=2002)
    train, val = (reader.read(s) for s in ("train", "val"))
    assert train.rejected == {"crosses a split boundary": 3}
    assert train.examples_read + val.examples_read == 20 - 4 + 1
    assert all(w.end.year == 2001 for w, _ in val.pairs)
    with pytest.raises(DataError, match=r"no test window of 3 \+ 1 consecutive `D` steps .*: its 0 row\(s\) in "
                                        r"those years are fewer than the 4 one window needs"):
        reader.read("test")
    short = _csv(tmp_path / "short.csv", _frame(20, start="2000-12-30"))  # two days of 2000
    reader = SeriesWindows(path=short, features=["x"], label="y", window=3, horizon=1, calendar=False,
                           val_from=2001, test_from=2002)
    with pytest.raises(DataError, match=r"no train window .*: its 2 row\(s\) in those years are fewer than the 4"):
        reader.read("train")


def test_the_error_nan_policy_names_the_csv_lines(tmp_path):
    frame = _frame(30)
    frame["x"] = frame["x"].astype(object)
    frame.loc[[4, 9], "x"] = ""
    path = _csv(tmp_path / "d.csv", frame)
    with pytest.raises(DataError, match=r"2 row\(s\) with a missing reading, on lines 6, 11;"):
        SeriesWindows(path=path, features=["x"], label="y", window=5, horizon=1).read("train")
    frame.loc[4, "x"] = "warm"
    _csv(tmp_path / "d.csv", frame)
    with pytest.raises(DataError, match=r"`x` is not a finite number on line 6$"):
        SeriesWindows(path=path, features=["x"], label="y", window=5, horizon=1).read("train")


@pytest.mark.parametrize("method", ["ffill", "interpolate"])
def test_imputation_fills_short_runs_only_and_rejects_what_remains(method, tmp_path):
    frame = _frame(30)
    frame.loc[3:4, "x"] = np.nan  # a run of 2 missing days: filled with impute_limit 2
    frame.loc[10:14, "x"] = np.nan  # a run of 5: left missing, and its windows rejected
    reader = SeriesWindows(path=_csv(tmp_path / "d.csv", frame), features=["x"], label="y", window=5, horizon=1,
                          nan_policy="impute", impute_method=method, impute_limit=2, calendar=False)
    filled = reader.frame()["x"]
    assert filled[3:5].notna().all() and filled[10:15].isna().all()
    if method == "interpolate":
        assert filled[3] == pytest.approx(frame["x"][2] + (frame["x"][5] - frame["x"][2]) / 3, abs=1e-6)
    else:
        assert filled[4] == frame["x"][2]
    split = reader.read("train")
    assert split.rejected["missing reading after imputation"] == 5 + 4  # windows touching rows 10-14
    assert all(not np.isnan(w.values).any() for w, _ in split.pairs)
    assert split.examples_read == len(split.pairs) + sum(split.rejected.values())


def test_the_scaler_sees_only_training_rows(tmp_path):
    frame = _frame(90, start="2000-11-01")
    frame.loc[frame["date"].dt.year >= 2001, "x"] = 1000.0  # validation years hold huge values
    reader = SeriesWindows(path=_csv(tmp_path / "d.csv", frame), features=["x"], label="y", window=5, horizon=1,
                          calendar=False, val_from=2001, test_from=2002)
    scaler = Standardizer()
    scaler.fit([w for w, _ in reader.read("train").pairs])
    assert abs(scaler.mean[0]) < 1.0 and scaler.std[0] < 2.0
    val_window = reader.read("val").pairs[0][0]
    assert scaler.encode(val_window).min() > 100  # far outside the training distribution, as it should be


def test_masking_missing_readings_adds_indicators_and_no_nan_reaches_a_tensor(tmp_path):
    frame = _frame(20)
    frame.loc[3, "x"] = np.nan
    reader = SeriesWindows(path=_csv(tmp_path / "d.csv", frame), features=["x"], label="y", window=5, horizon=1,
                          nan_policy="mask", calendar=False)
    pairs = reader.read("train").pairs
    with pytest.raises(DataError, match="mask_missing"):
        strict = Standardizer()
        strict.fit([w for w, _ in pairs])
        strict.encode(pairs[0][0])
    scaler = Standardizer(mask_missing=True)
    scaler.fit([w for w, _ in pairs])
    x = scaler.encode(pairs[0][0])  # (W, 2F)
    assert x.shape == (5, 2) and torch.isfinite(x).all() and x[3, 1] == 1 and x[3, 0] == 0


def test_label_tokenizer_round_trips_and_names_its_label_ids():
    tok = LabelTokenizer()
    tok.fit([[0, 1, 0], [0, 0, 0]])
    assert tok.label_ids == (3, 4)
    assert tok.decode(tok.encode([1, 0, 1]).tolist()) == "1 0 1"


@pytest.fixture(scope="module")
def storm_data():
    """The storm experiment's fitted encoders and 64 validation windows, read once for every decoding mode."""
    config = compose(["experiment=storm_onset"])
    reader = SeriesWindows(**{k: v for k, v in config.data.items() if k != "name"})
    return fit_tokenizers(config, reader.read("train").pairs[:500]), [w for w, _ in reader.read("val").pairs[:64]]


@pytest.mark.parametrize("mode", ["decode.one_shot=false", "decode.one_shot=true", "decode.beam=3"])
def test_label_decoding_never_emits_a_non_label_token(mode, storm_data):
    states, windows = storm_data
    module = Seq2SeqModule(compose(["experiment=storm_onset", mode]), states)
    translator = Translator(module.eval())
    for _, batch in translator.batches(windows):
        tokens = module.decoder(module.model, batch.src, batch.src_keep)
        assert tokens.shape[1] == 7 and set(tokens.unique().tolist()) <= set(module.tgt_tok.label_ids)
    probs = translator.label_probabilities(windows)  # (N, H, C)
    assert probs.shape == (64, 7, 2)
    torch.testing.assert_close(probs.sum(-1), torch.ones(64, 7))


def test_scores_equal_the_reference_formulas():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    got = scores(p, y, threshold=0.5)
    assert got["auroc"] == pytest.approx(roc_auc_score(y, p), abs=1e-6)
    assert got["ap"] == pytest.approx(average_precision_score(y, p), abs=1e-6)
    assert got["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-6)
    hit = p >= 0.5
    tp, fp, fn = (hit & (y == 1)).sum(), (hit & (y == 0)).sum(), (~hit & (y == 1)).sum()
    assert got["csi"] == pytest.approx(tp / (tp + fp + fn)) and got["pod"] == pytest.approx(tp / (tp + fn))
    assert got["far"] == pytest.approx(fp / (tp + fp))
    assert got["csi"] == pytest.approx(f1_score(y, hit) / (2 - f1_score(y, hit)))  # F1 = 2 CSI / (1 + CSI)


def _learnable_series(path: Path, days: int = 3000) -> str:
    """Label of day t is 1 when the mean of x over days t-9..t-7 exceeds 0.3: every label of a 7-day horizon
    depends only on inputs inside the 20-day window before it."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=days)
    mean3 = pd.Series(x).rolling(3).mean().shift(7).fillna(0).to_numpy()
    frame = pd.DataFrame({"date": pd.date_range("1990-01-01", periods=days, freq="D"), "x": x.round(4),
                          "y": (mean3 > 0.3).astype(int)})
    return _csv(path, frame)


@pytest.mark.slow
@pytest.mark.parametrize("one_shot", [False, True])
def test_both_decoding_modes_learn_labels_that_depend_on_the_inputs(one_shot, tmp_path):
    path = _learnable_series(tmp_path / "series.csv")
    config = compose(["experiment=storm_onset", f"data.path={path}", "data.features=[x]", "data.label=y",
                      "data.window=20", "data.calendar=false", "data.nan_policy=error", "data.val_from=1996",
                      "data.test_from=1997", f"decode.one_shot={str(one_shot).lower()}", "trainer.max_epochs=25",
                      "loader.batch_size=32", "optim.warmup_steps=100", "optim.lr=2e-3", "model.dropout=0.0",
                      "monitor.patience=null", "trainer.enable_progress_bar=false"])
    module = train(config, tmp_path / "run")
    test = SeriesWindows(**{k: v for k, v in config.data.items() if k != "name"}).read("test")
    decoded = np.array([[int(v) for v in s.split()] for s in Translator(module).translate([w for w, _ in test.pairs])])
    accuracy = (decoded == np.array([t for _, t in test.pairs])).mean()
    assert accuracy >= 0.95, f"label accuracy {accuracy:.3f}"


