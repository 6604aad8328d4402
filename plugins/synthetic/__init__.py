"""Synthetic domain: copy, reverse, sort or add sequences of symbols, generated deterministically from a seed.

Contract: a raw item is a string of space-separated symbols ("3 1 4"); the `symbols` tokenizer maps each symbol to
one id; the core's `token` embedding and `linear` head do the rest. Examples are drawn from a seed, so every split
is the same on every machine and process; lengths vary within [min_len, max_len], so batches need padding.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seq2seq.domain import Reader, Rows, Tokenizer, read_lines
from seq2seq.errors import ConfigError, DataError, excerpt, some
from seq2seq.registry import DATASETS, TOKENIZERS
from seq2seq.schema import one_of

SPECIALS = ("<pad>", "<bos>", "<eos>")
CHUNK = 10_000  # examples per run of rows


@TOKENIZERS.register("symbols")
class SymbolTokenizer(Tokenizer):
    """One id per whitespace-separated symbol; the vocabulary is every symbol seen when fitting."""

    pad_id, bos_id, eos_id = 0, 1, 2

    def __init__(self) -> None:
        self.itos: list[str] = list(SPECIALS)
        self.stoi = {s: i for i, s in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def fit(self, items: list[str]) -> None:
        symbols = sorted({s for item in items for s in item.split()} - set(SPECIALS))
        self.load_state_dict({"itos": [*SPECIALS, *symbols]})

    def encode(self, item: str) -> Tensor:
        try:
            return torch.tensor([self.stoi[s] for s in item.split()], dtype=torch.long)  # (L,)
        except KeyError as err:
            raise DataError(f"symbol {err} in {excerpt(item)} is not in the vocabulary {self.itos[3:]}") from None

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.itos[i] for i in ids if i >= len(SPECIALS))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"itos": list(self.itos)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.itos = list(state["itos"])
        self.stoi = {s: i for i, s in enumerate(self.itos)}


def _target(task: str, xs: list[int], n_symbols: int) -> list[int]:
    if task == "copy":
        return xs
    if task == "reverse":
        return xs[::-1]
    if task == "sort":
        return sorted(xs)
    # add: the source is two base-n numbers (most significant digit first) split by a separator
    half = len(xs) // 2
    a, b = xs[:half], xs[half:]
    total = int("".join(map(str, a)) or "0", n_symbols) + int("".join(map(str, b)) or "0", n_symbols)
    digits = []
    while True:
        total, d = divmod(total, n_symbols)
        digits.append(d)
        if total == 0:
            return digits[::-1]


TASKS = ("copy", "reverse", "sort", "add")


@DATASETS.register("synthetic")
class SyntheticTask(Reader):
    """Generates `n_train`/`n_val`/`n_test` examples of `task` over symbols 0..n_symbols-1 (at most 36)."""

    def __init__(
        self,
        task: str = "reverse",
        n_symbols: int = 10,
        min_len: int = 1,
        max_len: int = 12,
        n_train: int = 10000,
        n_val: int = 500,
        n_test: int = 500,
        seed: int = 0,
    ) -> None:
        one_of("data.task", task, TASKS)
        if not 2 <= n_symbols <= 36:
            raise ConfigError(f"`data.n_symbols` must be within 2..36, got {n_symbols}")
        if not 1 <= min_len <= max_len:
            raise ConfigError(f"need 1 <= `data.min_len` ({min_len}) <= `data.max_len` ({max_len})")
        self.task, self.n_symbols, self.min_len, self.max_len = task, n_symbols, min_len, max_len
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.seed = seed

    def _symbol(self, i: int) -> str:
        return "0123456789abcdefghijklmnopqrstuvwxyz"[i]

    def stream(self, splits: Collection[str]) -> Iterator[Rows]:
        for split in (s for s in self.splits if s in splits):
            rng = random.Random(f"{self.seed}-{self.task}-{split}")  # a separate stream per split
            for start in range(0, self.sizes[split], CHUNK):
                pairs = []
                for _ in range(min(CHUNK, self.sizes[split] - start)):
                    xs = [rng.randrange(self.n_symbols) for _ in range(rng.randint(self.min_len, self.max_len))]
                    ys = _target(self.task, xs, self.n_symbols)
                    pairs.append((" ".join(map(self._symbol, xs)), " ".join(map(self._symbol, ys))))
                yield Rows(split, pairs)

    def write_sample(self, folder: Path) -> tuple[dict[str, Any], dict[str, int]]:
        """No file: the generator's own counts."""
        return {"n_train": 20, "n_val": 10, "n_test": 10}, {"train": 20, "val": 10, "test": 10}

    def read_inputs(self, path: str) -> list[str]:
        """One source per line; a blank line is an error (it would silently become an empty output)."""
        lines, bad = read_lines(path)
        if bad:
            raise DataError(f"{path}: blank or undecodable input on line(s) {some(bad)}; every line must hold one "
                            "sequence")
        return lines
