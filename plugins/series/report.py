"""Scores, baselines and plots for the series domain, written beside the model's scores in metrics.json.

Every method is scored on the same windows: AUROC, average precision, Brier score, and F1 at a threshold chosen
on the validation windows (per method), for each lead day and over all lead days; Brier skill against
climatology. Baselines:
- climatology: the onset rate by day of year over the training years, smoothed over ±15 days;
- persistence: the onset rate over the input window's own days;
- logistic: one logistic regression per lead day on the same standardized input window.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TextIO

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torchmetrics.functional.classification import (
    binary_auroc,
    binary_average_precision,
    binary_f1_score,
)

from seq2seq.domain import Encoder, Split
from seq2seq.translate import Translator

POSITIVE = 1  # the label value whose probability is scored


def scores(prob: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, float]:
    """AUROC, AP, Brier and F1 at `threshold` of probabilities against 0/1 labels (any matching shapes)."""
    p, t = torch.as_tensor(prob, dtype=torch.float32).flatten(), torch.as_tensor(y).long().flatten()
    return {
        "auroc": float(binary_auroc(p, t)),
        "ap": float(binary_average_precision(p, t)),
        "brier": float(((p - t.float()) ** 2).mean()),
        "f1": float(binary_f1_score(p, t, threshold=threshold)),
    }


def best_threshold(prob: np.ndarray, y: np.ndarray) -> float:
    """The threshold that maximizes F1 on these (validation) predictions."""
    candidates = np.unique(np.quantile(prob, np.linspace(0.5, 0.999, 200)))
    f1 = [scores(prob, y, float(c))["f1"] for c in candidates]
    return float(candidates[int(np.argmax(f1))])


def model_probabilities(translator: Translator, windows: list) -> np.ndarray:
    """P(positive label) per window and lead day: (N, H)."""
    classes = translator.module.tgt_tok.classes
    return translator.label_probabilities(windows)[..., classes.index(POSITIVE)].numpy()


def climatology(train: Split, windows: list, horizon: int) -> np.ndarray:
    """Onset rate by day of year over the training windows' target days, smoothed over ±15 days."""
    hits, days = np.zeros(367), np.zeros(367)
    for window, target in train.pairs:
        for k, label in enumerate(target, 1):
            doy = (window.end + np.timedelta64(k, "D")).day_of_year
            hits[doy] += label
            days[doy] += 1
    kernel = np.ones(31)
    circular = lambda a: np.convolve(np.concatenate([a[-15:], a, a[:15]]), kernel, "valid")  # noqa: E731
    rate = circular(hits[1:]) / np.maximum(circular(days[1:]), 1)  # index doy - 1
    return np.array([[rate[(w.end + np.timedelta64(k, "D")).day_of_year - 1] for k in range(1, horizon + 1)]
                     for w in windows])


def persistence(windows: list, horizon: int) -> np.ndarray:
    return np.repeat(np.array([[np.nanmean(w.past_labels)] for w in windows]), horizon, axis=1)


def logistic(encoder: Encoder, train: Split, windows: dict[str, list]) -> dict[str, np.ndarray]:
    """One logistic regression per lead day on the flattened, standardized input window."""
    features = lambda ws: np.stack([encoder.encode(w).flatten().numpy() for w in ws])  # noqa: E731
    x_train, y_train = features([w for w, _ in train.pairs]), np.array([t for _, t in train.pairs])
    fits = [LogisticRegression(max_iter=2000).fit(x_train, y_train[:, k]) for k in range(y_train.shape[1])]
    return {split: np.stack([f.predict_proba(features(ws))[:, 1] for f in fits], axis=1)
            for split, ws in windows.items()}


def report(translator: Translator, splits: dict[str, Split], run_dir: Path) -> dict[str, float]:
    windows = {s: [w for w, _ in splits[s].pairs] for s in ("val", "test")}
    labels = {s: np.array([t for _, t in splits[s].pairs]) for s in ("val", "test")}
    horizon = labels["test"].shape[1]
    probs = {
        "model": {s: model_probabilities(translator, windows[s]) for s in windows},
        "climatology": {s: climatology(splits["train"], windows[s], horizon) for s in windows},
        "persistence": {s: persistence(windows[s], horizon) for s in windows},
        "logistic": logistic(translator.module.src_tok, splits["train"], windows),
    }
    out: dict[str, float] = {}
    for method, p in probs.items():
        prefix = "test/" if method == "model" else f"test/{method}/"
        threshold = best_threshold(p["val"], labels["val"])
        out[f"{prefix}threshold"] = threshold
        out.update({prefix + k: v for k, v in scores(p["test"], labels["test"], threshold).items()})
        for k in range(horizon):
            lead = scores(p["test"][:, k], labels["test"][:, k], threshold)
            out.update({f"{prefix}lead{k + 1}/{name}": v for name, v in lead.items()})
    for method in probs:
        prefix = "test/" if method == "model" else f"test/{method}/"
        out[f"{prefix}bss_climatology"] = 1 - out[f"{prefix}brier"] / out["test/climatology/brier"]
        for k in range(1, horizon + 1):
            out[f"{prefix}lead{k}/bss_climatology"] = (
                1 - out[f"{prefix}lead{k}/brier"] / out[f"test/climatology/lead{k}/brier"])
    plot_dir = run_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    plot_reliability(probs, labels["test"], plot_dir / "reliability.png")
    plot_lead_skill(out, list(probs), horizon, plot_dir / "lead_skill.png")
    plot_attention(translator, splits["test"], plot_dir / "attention.png")
    return out


def plot_reliability(probs: dict, y: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for method in ("model", "logistic", "climatology"):
        p = probs[method]["test"].flatten()
        edges = np.unique(np.quantile(p, np.linspace(0, 1, 11)))
        bins = np.clip(np.digitize(p, edges[1:-1]), 0, len(edges) - 2)
        used = [b for b in range(len(edges) - 1) if (bins == b).any()]
        ax.plot([p[bins == b].mean() for b in used], [y.flatten()[bins == b].mean() for b in used], "o-", label=method)
    top = max(ax.get_xlim()[1], ax.get_ylim()[1])
    ax.plot([0, top], [0, top], "k:", label="perfect")
    ax.set(xlabel="forecast probability (decile bins)", ylabel="observed onset frequency",
           title="Reliability, test years")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_lead_skill(out: dict[str, float], methods: list[str], horizon: int, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    leads = range(1, horizon + 1)
    for method in methods:
        prefix = "test/" if method == "model" else f"test/{method}/"
        for ax, metric in zip(axes, ("auroc", "bss_climatology"), strict=True):
            ax.plot(leads, [out[f"{prefix}lead{k}/{metric}"] for k in leads], "o-", label=method)
    axes[0].set(xlabel="lead day", ylabel="AUROC", title="Discrimination by lead day")
    axes[1].set(xlabel="lead day", ylabel="Brier skill vs climatology", title="Skill by lead day")
    axes[1].axhline(0, color="k", lw=0.5)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_attention(translator: Translator, test: Split, path: Path, n: int = 3) -> None:
    """Cross-attention of the last decoder layer (mean over heads): forecast days × input days."""
    chosen = [pair for pair in test.pairs if any(pair[1])][:n] or test.pairs[:n]
    module = translator.module
    fig, axes = plt.subplots(1, len(chosen), figsize=(4 * len(chosen), 3), squeeze=False)
    for ax, (window, target) in zip(axes[0], chosen, strict=True):
        src = module.src_tok.encode(window)[None]  # (1, W, F)
        tgt_in = translator.decoder.teacher_input(module.tgt_tok.encode(target)[None])  # (1, H)
        weights = module.model.cross_attention(src, torch.ones(src.shape[:2], dtype=torch.bool), tgt_in)
        ax.imshow(weights[0].mean(0).numpy(), aspect="auto", cmap="viridis")
        ax.set(title=f"window ending {window.end.date()}\nonsets {target}", xlabel="input day",
               ylabel="forecast day")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def write_predictions(translator: Translator, windows: list, out: TextIO) -> int:
    """CSV: window_end, lead_day, date, probability (of the positive label), label (the decoded label)."""
    probs = model_probabilities(translator, windows)
    labels = translator.translate(windows)
    rows = csv.writer(out)
    rows.writerow(["window_end", "lead_day", "date", "probability", "label"])
    for w, p, decoded in zip(windows, probs, labels, strict=True):
        for k, (pk, label) in enumerate(zip(p, decoded.split(), strict=True), 1):
            day = (w.end + np.timedelta64(k, "D")).date()
            rows.writerow([w.end.date(), k, day, f"{pk:.6f}", label])
    return len(windows)
