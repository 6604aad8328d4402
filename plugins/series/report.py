"""Scores, baselines, calibration and plots for the series domain, written beside the model's scores in metrics.json.

Every method is scored on the same test windows, for each lead step and over all of them: AUROC, average
precision, Brier score and Brier skill against climatology (BSS) with a 95% bootstrap interval that resamples test
*years* (windows of one year are not independent), expected calibration error (ECE, 10 equal-width bins), and
CSI, POD and FAR at the threshold that maximizes CSI on the validation windows (the cyclone-genesis verification
convention). Nothing is tuned on the test years. Methods:
- model: the network's probabilities; `model_calibrated` with `data.calibration` temperature or isotonic, fitted
  on the validation windows;
- climatology: the positive rate by day of year of the forecast date over the training years, smoothed ±15 days;
- persistence: the positive rate over the input window's own steps;
- logistic: one logistic regression per lead step on the same encoded inputs (covariates and the forecast
  steps' calendar included).
The test windows' probabilities are saved to `series_test.npz` (pooled by `seq2seq backtest`).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TextIO

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from torchmetrics.functional.classification import binary_auroc, binary_average_precision

from seq2seq.domain import Decodes, Encoder, Split

POSITIVE = 1  # the label value whose probability is scored
EPS = 1e-6


def scores(prob: np.ndarray, y: np.ndarray, threshold: float | np.ndarray) -> dict[str, float]:
    """AUROC, AP, Brier, ECE and CSI/POD/FAR at `threshold` (one, or one per forecast) of probabilities against
    0/1 labels (same shapes)."""
    p, t = torch.as_tensor(prob, dtype=torch.float32).flatten(), torch.as_tensor(y).long().flatten()
    hit = np.ravel(np.asarray(prob) >= np.broadcast_to(threshold, np.shape(prob)))
    yes = t.numpy().astype(bool)
    tp, fp, fn = int((hit & yes).sum()), int((hit & ~yes).sum()), int((~hit & yes).sum())
    return {
        "auroc": float(binary_auroc(p, t)),
        "ap": float(binary_average_precision(p, t)),
        "brier": float(((p - t.float()) ** 2).mean()),
        "ece": ece(p.numpy(), yes),
        "csi": tp / max(tp + fp + fn, 1),
        "pod": tp / max(tp + fn, 1),
        "far": fp / max(tp + fp, 1),
    }


def ece(prob: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error: Σ_b (n_b / N) · |mean forecast_b - observed frequency_b|, equal-width bins."""
    prob, y = np.ravel(prob), np.ravel(y).astype(float)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    n = np.bincount(which, minlength=bins)
    gap = np.abs(np.bincount(which, prob, bins) - np.bincount(which, y, bins))  # n_b · |mean p - mean y|
    return float(gap.sum() / max(n.sum(), 1))


def best_threshold(prob: np.ndarray, y: np.ndarray) -> float:
    """The threshold that maximizes CSI on these (validation) predictions."""
    candidates = np.unique(np.quantile(prob, np.linspace(0.5, 0.999, 200)))
    csi = [scores(prob, y, float(c))["csi"] for c in candidates]
    return float(candidates[int(np.argmax(csi))])


def bootstrap_bss(prob: np.ndarray, ref: np.ndarray, y: np.ndarray, years: np.ndarray, n: int = 2000,
                  seed: int = 0) -> tuple[float, float]:
    """95% interval of the Brier skill of `prob` against `ref` (rows: windows), resampling whole years."""
    groups, index = np.unique(years, return_inverse=True)
    err = lambda p: np.bincount(index, ((p - y) ** 2).reshape(len(years), -1).sum(1), len(groups))  # noqa: E731
    model, base = err(prob), err(ref)  # squared errors summed per year (G,)
    draws = np.random.default_rng(seed).integers(0, len(groups), (n, len(groups)))
    counts = np.stack([np.bincount(d, minlength=len(groups)) for d in draws])  # (n, G) times each year is drawn
    skill = 1 - counts @ model / np.maximum(counts @ base, EPS)
    low, high = np.percentile(skill, [2.5, 97.5])
    return float(low), float(high)


def fit_calibration(kind: str, prob: np.ndarray, y: np.ndarray):
    """A map of probabilities fitted on (validation) forecasts: temperature scaling of the log-odds by the 1/T that
    minimizes log loss, or isotonic regression."""
    p, t = np.clip(np.ravel(prob), EPS, 1 - EPS), np.ravel(y).astype(float)
    if kind == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(p, t)
        return lambda q: iso.predict(np.ravel(q)).reshape(np.shape(q))
    logit = np.log(p / (1 - p))

    def loss(log_t: float) -> float:
        q = np.clip(1 / (1 + np.exp(-logit / np.exp(log_t))), EPS, 1 - EPS)
        return float(-(t * np.log(q) + (1 - t) * np.log(1 - q)).mean())

    temperature = float(np.exp(minimize_scalar(loss, bounds=(-3, 3), method="bounded").x))

    def scale(q: np.ndarray) -> np.ndarray:
        q = np.clip(q, EPS, 1 - EPS)
        return 1 / (1 + np.exp(-np.log(q / (1 - q)) / temperature))

    scale.temperature = temperature  # type: ignore[attr-defined]
    return scale


def model_probabilities(translator: Decodes, windows: list) -> np.ndarray:
    """P(positive label) per window and lead step: (N, H)."""
    classes = translator.tgt_tok.classes
    return translator.label_probabilities(windows)[..., classes.index(POSITIVE)].numpy()


def climatology(train: Split, windows: list) -> np.ndarray:
    """Positive rate by day of year of the forecast date over the training windows, smoothed over ±15 days."""
    hits, days = np.zeros(367), np.zeros(367)
    for window, target in train.pairs:
        doy = window.ahead.day_of_year.to_numpy()
        np.add.at(hits, doy, target)
        np.add.at(days, doy, 1)
    kernel = np.ones(31)
    circular = lambda a: np.convolve(np.concatenate([a[-15:], a, a[:15]]), kernel, "valid")  # noqa: E731
    rate = circular(hits[1:]) / np.maximum(circular(days[1:]), 1)  # index doy - 1
    return np.stack([rate[w.ahead.day_of_year.to_numpy() - 1] for w in windows])


def persistence(windows: list, horizon: int) -> np.ndarray:
    return np.repeat(np.array([[np.nanmean(w.past_labels)] for w in windows]), horizon, axis=1)


def logistic(encoder: Encoder, train: Split, windows: dict[str, list]) -> dict[str, np.ndarray]:
    """One logistic regression per lead step on the flattened encoded input window (known-future rows included)."""
    features = lambda ws: np.stack([encoder.encode(w).flatten().numpy() for w in ws])  # noqa: E731
    x_train, y_train = features([w for w, _ in train.pairs]), np.array([t for _, t in train.pairs])
    fits = [LogisticRegression(max_iter=2000).fit(x_train, y_train[:, k]) for k in range(y_train.shape[1])]
    return {split: np.stack([f.predict_proba(features(ws))[:, 1] for f in fits], axis=1)
            for split, ws in windows.items()}


def score_methods(probs: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray], years: np.ndarray,
                  thresholds: dict[str, np.ndarray] | None = None) -> dict[str, float]:
    """Every method's scores on the test windows (keys `test/` for the model, `test/<method>/` for the others),
    per lead step and overall, with BSS against climatology and its year-block bootstrap interval. Thresholds are
    chosen on the validation windows, unless given (one per test window: pooled folds keep their own)."""
    out: dict[str, float] = {}
    y, horizon = labels["test"], labels["test"].shape[1]
    clim = probs["climatology"]["test"]
    for method, p in probs.items():
        prefix = "test/" if method == "model" else f"test/{method}/"
        if thresholds:
            threshold = thresholds[method][:, None]  # (N, 1)
        else:
            threshold = best_threshold(p["val"], labels["val"])
            out[f"{prefix}threshold"] = threshold
        for lead, cols in [("", slice(None)), *((f"lead{k + 1}/", slice(k, k + 1)) for k in range(horizon))]:
            got = scores(p["test"][:, cols], y[:, cols], threshold)
            got["bss_climatology"] = 1 - got["brier"] / max(float(((clim[:, cols] - y[:, cols]) ** 2).mean()), EPS)
            low, high = bootstrap_bss(p["test"][:, cols], clim[:, cols], y[:, cols], years)
            got |= {"bss_climatology_low": low, "bss_climatology_high": high}
            out.update({f"{prefix}{lead}{name}": v for name, v in got.items()})
    return out


def report(translator: Decodes, splits: dict[str, Split], run_dir: Path, calibration: str = "none"
           ) -> dict[str, float]:
    windows = {s: [w for w, _ in splits[s].pairs] for s in ("val", "test")}
    labels = {s: np.array([t for _, t in splits[s].pairs]) for s in ("val", "test")}
    horizon = labels["test"].shape[1]
    probs = {
        "model": {s: model_probabilities(translator, windows[s]) for s in windows},
        "climatology": {s: climatology(splits["train"], windows[s]) for s in windows},
        "persistence": {s: persistence(windows[s], horizon) for s in windows},
        "logistic": logistic(translator.src_tok, splits["train"], windows),
    }
    extra: dict[str, float] = {}
    if calibration != "none":
        calibrate = fit_calibration(calibration, probs["model"]["val"], labels["val"])
        probs["model_calibrated"] = {s: calibrate(p) for s, p in probs["model"].items()}
        if hasattr(calibrate, "temperature"):
            extra["test/model_calibrated/temperature"] = calibrate.temperature
    years = np.array([w.end.year for w in windows["test"]])
    out = score_methods(probs, labels, years) | extra
    np.savez_compressed(run_dir / "series_test.npz", y=labels["test"], years=years,
                        **{f"prob_{m}": p["test"] for m, p in probs.items()},
                        **{f"threshold_{m}": out[("test/" if m == "model" else f"test/{m}/") + "threshold"]
                           for m in probs})
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    plot_reliability({m: p["test"] for m, p in probs.items()}, labels["test"], plot_dir / "reliability.png")
    plot_lead_skill(out, list(probs), horizon, plot_dir / "lead_skill.png")
    plot_attention(translator, splits["test"], plot_dir / "attention.png")
    return out


def pooled_report(fold_dirs: list[Path], run_dir: Path) -> dict[str, float]:
    """The folds' test windows pooled (each fold's thresholds kept), scored as one test set; plots/backtest.png."""
    saved = [np.load(d / "series_test.npz") for d in fold_dirs]
    methods = [k.removeprefix("prob_") for k in saved[0].files if k.startswith("prob_")]
    y, years = np.concatenate([f["y"] for f in saved]), np.concatenate([f["years"] for f in saved])
    probs = {m: {"test": np.concatenate([f[f"prob_{m}"] for f in saved])} for m in methods}
    thresholds = {m: np.concatenate([np.full(len(f["y"]), float(f[f"threshold_{m}"])) for f in saved])
                  for m in methods}
    out = score_methods(probs, {"test": y}, years, thresholds)
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    plot_lead_skill(out, methods, y.shape[1], plot_dir / "backtest_lead_skill.png")
    per_fold = [score_methods({m: {"test": f[f"prob_{m}"]} for m in methods}, {"test": f["y"]}, f["years"],
                              {m: np.full(len(f["y"]), float(f[f"threshold_{m}"])) for m in methods})
                for f in saved]
    plot_folds(per_fold, [f"{int(f['years'].min())}-{int(f['years'].max())}" for f in saved], methods,
               plot_dir / "backtest_folds.png")
    return out


def plot_folds(per_fold: list[dict[str, float]], names: list[str], methods: list[str], path: Path) -> None:
    """Each fold's overall AUROC and Brier skill (95% year bootstrap) by method."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    for i, method in enumerate(methods):
        prefix = "test/" if method == "model" else f"test/{method}/"
        shift = x + (i - len(methods) / 2) * 0.08
        axes[0].plot(shift, [f[f"{prefix}auroc"] for f in per_fold], "o", label=method)
        bss = np.array([f[f"{prefix}bss_climatology"] for f in per_fold])
        err = np.maximum([bss - [f[f"{prefix}bss_climatology_low"] for f in per_fold],
                          np.array([f[f"{prefix}bss_climatology_high"] for f in per_fold]) - bss], 0)
        axes[1].errorbar(shift, bss, yerr=err, fmt="o", capsize=3, label=method)
    for ax, label in zip(axes, ("AUROC, all lead steps", "Brier skill vs climatology"), strict=True):
        ax.set(xticks=x, xticklabels=names, xlabel="test block", ylabel=label)
    axes[1].axhline(0, color="k", lw=0.5)
    axes[0].legend()
    fig.suptitle("Rolling-origin backtest")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_reliability(probs: dict[str, np.ndarray], y: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for method in (m for m in ("model", "model_calibrated", "logistic", "climatology") if m in probs):
        p = probs[method].flatten()
        edges = np.unique(np.quantile(p, np.linspace(0, 1, 11)))
        bins = np.clip(np.digitize(p, edges[1:-1]), 0, len(edges) - 2)
        used = [b for b in range(len(edges) - 1) if (bins == b).any()]
        ax.plot([p[bins == b].mean() for b in used], [y.flatten()[bins == b].mean() for b in used], "o-",
                label=f"{method} (ECE {ece(p, y):.3f})")
    top = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([0, top], [0, top], "k:", label="perfect")
    ax.set(xlabel="forecast probability (decile bins)", ylabel="observed frequency", title="Reliability, test years")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_lead_skill(out: dict[str, float], methods: list[str], horizon: int, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    leads = np.arange(1, horizon + 1)
    for method in methods:
        prefix = "test/" if method == "model" else f"test/{method}/"
        axes[0].plot(leads, [out[f"{prefix}lead{k}/auroc"] for k in leads], "o-", label=method)
        bss = np.array([out[f"{prefix}lead{k}/bss_climatology"] for k in leads])
        low = np.array([out[f"{prefix}lead{k}/bss_climatology_low"] for k in leads])
        high = np.array([out[f"{prefix}lead{k}/bss_climatology_high"] for k in leads])
        # A percentile interval need not hold its point estimate: clip the bars at it
        axes[1].errorbar(leads, bss, yerr=np.maximum([bss - low, high - bss], 0), fmt="o-", capsize=3,
                         label=method)
    axes[0].set(xlabel="lead step", ylabel="AUROC", title="Discrimination by lead step")
    axes[1].set(xlabel="lead step", ylabel="Brier skill vs climatology (95% year bootstrap)",
                title="Skill by lead step")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_attention(translator: Decodes, test: Split, path: Path, n: int = 3) -> None:
    """Cross-attention of the last decoder layer (mean over heads): forecast steps × input steps."""
    chosen = [pair for pair in test.pairs if any(pair[1])][:n] or test.pairs[:n]
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3), squeeze=False)
    for ax, (window, target) in zip(axes[0], chosen, strict=True):
        weights = translator.cross_attention(window, translator.tgt_tok.encode(target).tolist())  # (H, H', W[+H])
        ax.imshow(weights.mean(0).numpy()[:, : len(window.values)], aspect="auto", cmap="viridis")
        ax.set(title=f"window ending {stamp(window.end)}\nlabels {target}", xlabel="input step",
               ylabel="forecast step")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def stamp(t: pd.Timestamp) -> str:
    """A date, or a date and time for sub-daily steps."""
    return str(t.date()) if t == t.normalize() else t.isoformat(sep=" ")


def write_predictions(translator: Decodes, windows: list, out: TextIO, val: Split | None = None,
                      calibration: str = "none") -> int:
    """CSV: [series,] window_end, lead_step, date, probability (of the positive label), label (the decoded label),
    and with the validation windows `val`: probability_raw (the model's own, when `calibration` maps it), threshold
    (the one that maximized CSI on the validation windows) and alert (1 where the probability reaches it)."""
    probs = model_probabilities(translator, windows)
    labels = translator.translate(windows)
    named = any(w.series for w in windows)
    extra, columns = [], []
    if val is not None:
        val_p, val_y = model_probabilities(translator, [w for w, _ in val.pairs]), np.array([t for _, t in val.pairs])
        raw = probs
        if calibration != "none":
            calibrate = fit_calibration(calibration, val_p, val_y)
            probs, val_p = calibrate(probs), calibrate(val_p)
            extra.append(raw)
            columns.append("probability_raw")
        threshold = best_threshold(val_p, val_y)
        extra += [np.full(probs.shape, threshold), (probs >= threshold).astype(int)]
        columns += ["threshold", "alert"]
    rows = csv.writer(out)
    rows.writerow(["series"] * named + ["window_end", "lead_step", "date", "probability", "label", *columns])
    for i, (w, p, decoded) in enumerate(zip(windows, probs, labels, strict=True)):
        for k, (pk, label) in enumerate(zip(p, decoded.split(), strict=True), 1):
            more = [f"{e[i, k - 1]:.6f}" if e.dtype.kind == "f" else int(e[i, k - 1]) for e in extra]
            rows.writerow([w.series] * named + [stamp(w.end), k, stamp(w.ahead[k - 1]), f"{pk:.6f}", label, *more])
    return len(windows)
