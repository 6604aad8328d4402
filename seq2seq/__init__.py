"""seq2seq: one masked-attention encoder-decoder Transformer for every sequence-to-sequence domain.

The names below are imported on first use, so that `import seq2seq.domain` (what a plugin does, in every encoding
worker too) loads the contract alone, not Lightning and Hydra. Importing the package registers the core's own
embeddings and heads (`token`, `linear`); its metric (`exact_match`, on torchmetrics) is registered with the config.
Domains add theirs when the config's `plugins:` modules are imported.
"""

from __future__ import annotations

import importlib
from typing import Any

from seq2seq import embeddings, heads  # noqa: F401 - registers the core's embeddings and heads

_HOMES = {
    "Batch": "data", "ConfigError": "errors", "DataError": "errors", "EncoderDecoder": "model",
    "FeatureEncoder": "domain", "ModelSpec": "model", "Reader": "domain", "Rows": "domain",
    "Seq2SeqModule": "module", "Split": "domain", "Tokenizer": "domain", "TrainConfig": "schemas",
    "Translator": "translate", "compose": "config", "evaluate": "inference", "predict": "inference",
    "prepare": "training", "train": "training", "validate": "config",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'seq2seq' has no attribute {name!r}")
    return getattr(importlib.import_module(f"seq2seq.{_HOMES[name]}"), name)
