"""seq2seq: one masked-attention encoder-decoder Transformer for every sequence-to-sequence domain.

Importing the package registers the core's own components (the `token` embedding, the `linear` head, the
`exact_match` metric); domains add theirs when the config's `plugins:` modules are imported.
"""

from seq2seq import embeddings, heads, metrics  # noqa: F401 - registers the core components
from seq2seq.config import TrainConfig, compose, validate
from seq2seq.data import Batch
from seq2seq.domain import FeatureEncoder, Reader, Rows, Split, Tokenizer
from seq2seq.errors import ConfigError, DataError
from seq2seq.model import EncoderDecoder, ModelSpec
from seq2seq.module import Seq2SeqModule
from seq2seq.pipeline import evaluate, predict, prepare, train
from seq2seq.translate import Translator

__all__ = [
    "Batch", "ConfigError", "DataError", "EncoderDecoder", "FeatureEncoder", "ModelSpec", "Reader", "Rows",
    "Seq2SeqModule", "Split", "Tokenizer", "TrainConfig", "Translator", "compose", "evaluate", "predict", "prepare",
    "train", "validate",
]
