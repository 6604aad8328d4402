"""The series domain's components: a `Window` (one raw source), the `standardize` source encoder, the `labels`
target tokenizer and the `linear` value embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from seq2seq.domain import FeatureEncoder, Tokenizer
from seq2seq.errors import DataError
from seq2seq.registry import EMBEDDINGS, TOKENIZERS

SPECIALS = ("<pad>", "<bos>", "<eos>")


@dataclass
class Window:
    """One input window: values (W, F) float32, its last date, the labels observed on its steps (W,), the
    forecast dates (H,), the known-future covariates of those steps on the same F columns (NaN where unknown) or
    None, and the series it belongs to."""

    values: np.ndarray
    end: pd.Timestamp
    past_labels: np.ndarray
    ahead: pd.DatetimeIndex
    future: np.ndarray | None = None
    series: str = ""  # which series, when one CSV holds several (`data.series_column`)


@TOKENIZERS.register("standardize")
class Standardizer(FeatureEncoder):
    """Scales each feature to zero mean, unit variance, with statistics fitted on training windows; appends a
    window's known-future rows (scaled alike, 0 where unknown) and declares them as `future_steps`."""

    def __init__(self, mask_missing: bool = False) -> None:
        self.mask_missing = mask_missing
        self.mean: list[float] = []
        self.std: list[float] = []

    @property
    def n_features(self) -> int:
        return len(self.mean) * (2 if self.mask_missing else 1)

    def fit(self, items: list[Window]) -> None:
        values = np.concatenate([w.values for w in items])  # (rows, F)
        std = np.nanstd(values, axis=0)
        future = items[0].future
        self.load_state_dict({"mean": np.nanmean(values, axis=0).tolist(), "std": np.where(std > 0, std, 1).tolist(),
                              "future_steps": 0 if future is None else len(future)})

    def _scaled(self, values: np.ndarray) -> np.ndarray:
        return (values - np.asarray(self.mean)) / np.asarray(self.std)

    def encode(self, item: Window) -> Tensor:
        x = self._scaled(item.values)  # (W, F)
        missing = np.isnan(x)
        if missing.any() and not self.mask_missing:
            raise DataError(f"window ending {item.end} has missing readings; set `tokenizer.src.mask_missing"
                            "=true` to mask them, or choose another `data.nan_policy`")
        if self.mask_missing:
            x = np.concatenate([np.where(missing, 0.0, x), missing], axis=1)  # (W, 2F): values, indicators
        if self.future_steps:
            if item.future is None or len(item.future) != self.future_steps:
                raise DataError(f"window ending {item.end}: the encoder was fitted with {self.future_steps} "
                                "known-future steps; read windows with the same `data.horizon` and "
                                "`data.future_calendar`")
            ahead = np.nan_to_num(self._scaled(item.future), nan=0.0)  # (H, F)
            if self.mask_missing:
                ahead = np.concatenate([ahead, np.zeros_like(ahead)], axis=1)
            x = np.concatenate([x, ahead])  # (W + H, F')
        return torch.as_tensor(x, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "future_steps": self.future_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.std = list(state["mean"]), list(state["std"])
        self.future_steps = int(state.get("future_steps", 0))


@TOKENIZERS.register("labels")
class LabelTokenizer(Tokenizer):
    """A small target vocabulary: the specials, then one id per label value seen in training."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.classes: list[int] = []

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.classes)

    @property
    def label_ids(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(range(len(SPECIALS), self.vocab_size))

    def fit(self, items: list[list[int]]) -> None:
        self.classes = sorted({int(v) for item in items for v in item})

    def encode(self, item: list[int]) -> Tensor:
        return torch.tensor([len(SPECIALS) + self.classes.index(int(v)) for v in item], dtype=torch.long)

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(self.classes[i - len(SPECIALS)]) for i in ids if i >= len(SPECIALS))

    def pieces(self, ids: list[int]) -> list[str]:
        return [SPECIALS[i] if i < len(SPECIALS) else str(self.classes[i - len(SPECIALS)]) for i in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.classes = list(state["classes"])


@EMBEDDINGS.register("linear")
class ValueEmbedding(nn.Module):
    """Feature vectors (B, W, F) -> (B, W, D) by one linear map."""

    def __init__(self, n_features: int, d_model: int) -> None:
        super().__init__()
        self.proj = nn.Linear(n_features, d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)
