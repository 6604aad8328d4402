"""The declared contract between the core and a domain plugin: what a domain supplies, and all the core may call.

A domain registers, in the registries of `registry.py`:

- a **reader** (`DATASETS`): a `Reader` subclass. It names its splits and the files it reads, streams the raw
  (source, target) pairs of the splits asked for in runs of rows (`Rows`: the kept pairs and the rejected rows by
  reason, with the file and corpus they came from), and reads raw sources for inference (`read_inputs`). Hooks
  with defaults here: `report` (domain scores, baselines and plots after training or evaluation; none by default),
  `write_predictions` (one decoded line per source by default), `plot_attention` (refused by default), and for
  readers that split by year, `year_span` and `backtest_report` (what `seq2seq backtest` needs).
- a **source encoder** (`TOKENIZERS`): a `Tokenizer` (raw item -> token ids (S,)) or a `FeatureEncoder` (raw item
  -> feature values (S, F)). The source embedding is built with what the encoder declares in `embedding_context`.
- a **target tokenizer** (`TOKENIZERS`): a `Tokenizer`. When its outputs are a closed label set it declares
  `label_ids`, and every search emits nothing else.
- optionally embeddings (`EMBEDDINGS`), heads (`HEADS`, a head that can share the target embedding's weight
  subclasses `seq2seq.heads.TiedHead`) and metrics (`METRICS`).

Encoders are fitted on the training split (or a sample of it), and their `state_dict` (plain data) travels in the
prepared dataset and the checkpoint: a reloaded encoder must encode exactly as the fitted one did. `seq2seq prepare`
encodes the splits once, in batches (`encode_batch`), into Arrow shards (`seq2seq/prepared.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from torch import Tensor

from seq2seq.errors import ConfigError


class Encoder(ABC):
    """Turns raw items into tensors; fitted on the training split, saved inside checkpoints.

    A source encoder whose items carry known-future covariates (the calendar of each forecast day) declares
    `future_steps` H > 0 once fitted: the last H rows of every encoded source are then those covariates for output
    steps 1..H, with the source's width (0 where nothing is known ahead), and the core feeds them to the decoder's
    inputs at those steps instead of the encoder (`model.py`).
    """

    future_steps: int = 0

    @abstractmethod
    def fit(self, items: list[Any]) -> None: ...

    @abstractmethod
    def encode(self, item: Any) -> Tensor:
        """(L,) token ids or (L, F) feature values of one raw item, without BOS/EOS."""

    def encode_batch(self, items: list[Any]) -> list[Tensor] | list[list[int]]:
        """What `encode` gives for each item (or, for token ids, plain lists of them); override with the tokenizer
        library's batch call where it has one. Preparing a dataset encodes through this."""
        return [self.encode(item) for item in items]

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The fitted state as plain data (checkpoints load with `weights_only=True`)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def load_pretrained(self, folder: Path) -> None:
        """Take the state of a pretrained model's tokenizer from its files in `folder` (`seq2seq import`)."""
        raise ConfigError(f"{type(self).__name__} is fitted on data; it reads no pretrained model's files")

    @property
    @abstractmethod
    def pad_value(self) -> float:
        """What fills padded source positions (they are masked; the value only has to be harmless)."""

    @abstractmethod
    def embedding_context(self) -> dict[str, int]:
        """The values a source embedding is built with (`vocab_size` and `padding_idx`, or `n_features`)."""


class Tokenizer(Encoder):
    """Raw items <-> token ids. Special ids are inside the vocabulary; pad and eos differ, and decoding starts from
    bos, which may be pad (Marian) or eos (NLLB)."""

    pad_id: int
    bos_id: int
    eos_id: int
    label_ids: tuple[int, ...] | None = None  # a closed label set: the only ids a search may emit
    # Ids every output starts with after BOS (NLLB's target language): targets are trained with them, searches force
    # them (their log-probability is not scored, as transformers' forced BOS and CTranslate2's prefixes do).
    forced_prefix: tuple[int, ...] = ()
    # Text items: decode(encode(text)) == normalize(text) for text made of what fitting saw. A tokenizer that
    # cannot give text back (it joins words with spaces, say) says so with `lossless = False`.
    lossless: bool = True

    def normalize(self, text: str) -> str:
        """The form in which `decode` gives a text item back (e.g. after Unicode normalization)."""
        return text

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Ids (specials allowed, and dropped) -> the text that metrics score and users read."""

    def pieces(self, ids: list[int]) -> list[str]:
        """The token string of each id, distinct for distinct ids (attention plots, exported vocabularies);
        by default the ids in decimal."""
        return [str(i) for i in ids]

    @property
    def pad_value(self) -> float:
        return float(self.pad_id)

    def embedding_context(self) -> dict[str, int]:
        return {"vocab_size": self.vocab_size, "padding_idx": self.pad_id}


class FeatureEncoder(Encoder):
    """Raw items -> (L, F) float feature values (numeric series); sources only."""

    @property
    @abstractmethod
    def n_features(self) -> int: ...

    @property
    def pad_value(self) -> float:
        return 0.0

    def embedding_context(self) -> dict[str, int]:
        return {"n_features": self.n_features}


class Decodes(Protocol):
    """What a reader's hooks may ask of the model they report on, plot or predict with: a
    `seq2seq.translate.Translator` over a checkpoint or an exported model."""

    @property
    def src_tok(self) -> Encoder: ...

    @property
    def tgt_tok(self) -> Tokenizer: ...

    def translate(self, sources: list[Any]) -> list[str]:
        """The output string of each source."""

    def tokens(self, sources: list[Any]) -> list[list[int]]:
        """The decoded target ids of each source, cut at EOS."""

    def label_probabilities(self, sources: list[Any]) -> Tensor:
        """Label domains: (N, L, C) probability of each label per decoded position."""

    def cross_attention(self, source: Any, target: list[int]) -> Tensor:
        """(H, T, S) the last decoder layer's cross-attention for one source and target ids (teacher-forced)."""


@dataclass
class Rows:
    """A run of examples a reader read for one split from one file: the kept raw pairs, and the rejected ones by
    reason. `corpus` indexes the reader's `corpus_weights`. `lines` counts the file rows they were cut from when
    that differs from the examples (a series' windows overlap); by default one row per example."""

    split: str
    pairs: list[tuple[Any, Any]]
    rejected: Counter[str] = field(default_factory=Counter)
    file: str = ""
    corpus: int = 0
    lines: int | None = None

    @property
    def examples_read(self) -> int:
        return len(self.pairs) + sum(self.rejected.values())

    @property
    def lines_read(self) -> int:
        return self.examples_read if self.lines is None else self.lines


@dataclass
class Split:
    """One whole split in memory: the kept raw pairs, how many examples were read, and the rejections by reason."""

    pairs: list[tuple[Any, Any]]
    examples_read: int
    rejected: Counter[str] = field(default_factory=Counter)


class Reader(ABC):
    """A domain's data source, registered in `DATASETS` and configured by the `data:` block (its constructor's
    keyword arguments are the block's options). The constructor checks its options (ConfigError) and reads
    nothing: validation builds it to report a wrong value before any data are read. Encoders' constructors do the
    same."""

    splits: tuple[str, ...] = ("train", "val", "test")
    # The training split's corpora, by `Rows.corpus`: the share of training examples each is drawn for (as
    # OpenNMT's weights: 2.0 and 1.0 draw two examples of the first for each of the second, whatever their sizes).
    corpus_weights: tuple[float, ...] = (1.0,)

    @abstractmethod
    def stream(self, splits: Collection[str]) -> Iterator[Rows]:
        """The rows of `splits`, in a fixed order, a run at a time (memory stays flat on any corpus); a file that
        cannot be read is a DataError naming it."""

    def files(self) -> list[str]:
        """The files this reader reads (their sizes and times key the prepared dataset); missing ones are a
        DataError."""
        return []

    def read(self, split: str) -> Split:
        """One split in memory (for reports and small data)."""
        pairs, rejected = [], Counter()
        for rows in self.stream((split,)):
            pairs += rows.pairs
            rejected.update(rows.rejected)
        return Split(pairs, len(pairs) + sum(rejected.values()), rejected)

    @abstractmethod
    def read_inputs(self, path: str) -> list[Any]:
        """The raw sources in a file, for `predict` and `translate`; a bad line is a DataError naming it."""

    def report(self, translator: Decodes, run_dir: Path) -> dict[str, float]:
        """Domain scores, baselines and plots (under `run_dir`) after training or evaluation, reading what they need
        (`read`); merged into metrics.json."""
        return {}

    def write_sample(self, folder: Path) -> tuple[dict[str, Any], dict[str, int]] | None:
        """For the conformance kit (`testing.check_rows`): write a small data file in this reader's format into
        `folder`, with rows the reader must reject among them, and return the `data.*` options that read it and the
        file rows each split holds (what `lines_read` must add up to). None: the kit reads the configured data."""
        return None

    def target_length(self) -> int | None:
        """The length of every target, when the domain fixes it (a label for each step of a horizon): decoding must
        then produce exactly that many tokens (`decode.max_len_a=0`, `decode.max_len_b` equal to it), which
        `validate` checks. None: targets vary in length."""
        return None

    def year_span(self) -> tuple[int, int] | None:
        """The first and last year of the data, for a reader that splits by year through `val_from`, `test_from`
        and `test_to` (exclusive) options: what `seq2seq backtest` cuts into folds. None: it does not."""
        return None

    def backtest_report(self, fold_dirs: list[Path], run_dir: Path) -> dict[str, float]:
        """Scores pooled over the test blocks of a backtest's folds (each a finished training run directory), and
        plots under `run_dir`; none by default."""
        return {}

    def write_predictions(self, translator: Decodes, sources: list[Any], out: TextIO) -> int:
        """Write the predictions for `sources` to `out` (default: one decoded line each); returns how many."""
        outputs = translator.translate(sources)
        out.write("".join(line + "\n" for line in outputs))
        return len(outputs)

    def plot_attention(self, translator: Decodes, sources: list[Any], path: Path) -> None:
        """Save cross-attention heatmaps of `sources` to `path` (a PNG)."""
        raise ConfigError(f"the `{type(self).__name__}` reader draws no attention maps; drop `attention=`")


def read_lines(path: str | Path) -> tuple[list[str], list[int]]:
    """Lines of a UTF-8 text file split on newlines only (not on U+2028 and kin, as `str.splitlines` would), and
    the 1-based numbers of blank or undecodable lines, for the caller to report."""
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    if not text:
        return [], []
    lines = [line.removesuffix("\r") for line in text.removesuffix("\n").split("\n")]
    return lines, [i for i, line in enumerate(lines, 1) if not line.strip() or "\ufffd" in line]
