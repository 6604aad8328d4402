"""Text tokenizers, trained locally on the training split and saved inside checkpoints as plain data.

All share the special ids pad 0, bos 1, eos 2, unk 3; `decode` drops the specials and gives detokenized text
(what metrics score); `pieces` gives the token strings (for attention plots).
"""

from __future__ import annotations

import base64
import io
import re
import unicodedata
from collections import Counter
from typing import Any

import torch
from torch import Tensor

from seq2seq.domain import Tokenizer
from seq2seq.errors import ConfigError
from seq2seq.registry import TOKENIZERS
from seq2seq.schema import one_of

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
NORMALIZATIONS = ("none", "NFC", "NFKC")
MIN_VOCAB = 8  # the special tokens and a few pieces


class _TextTokenizer(Tokenizer):
    """Shared parts: special ids, Unicode normalization, and ids -> text without specials."""

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, normalization: str = "NFKC") -> None:
        one_of("tokenizer normalization", normalization, NORMALIZATIONS)
        self.normalization = normalization

    def normalize(self, text: str) -> str:
        return text if self.normalization == "none" else unicodedata.normalize(self.normalization, text)

    @staticmethod
    def check_vocab_size(vocab_size: int) -> None:
        if vocab_size < MIN_VOCAB:
            raise ConfigError(f"tokenizer `vocab_size` must be at least {MIN_VOCAB} (its special tokens and a few "
                              f"pieces), got {vocab_size}")

    def _content(self, ids: list[int]) -> list[int]:
        return [i for i in ids if i >= len(SPECIALS) or i == self.unk_id]


@TOKENIZERS.register("bpe")
class BPETokenizer(_TextTokenizer):
    """Byte-pair encoding trained with HF `tokenizers`; spaces are kept as '▁' so decoding restores the text."""

    def __init__(self, vocab_size: int = 8000, min_frequency: int = 2, normalization: str = "NFKC") -> None:
        super().__init__(normalization)
        self.check_vocab_size(vocab_size)
        self.vocab_size_wanted, self.min_frequency = vocab_size, min_frequency
        self._tok: Any = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def fit(self, items: list[str]) -> None:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=self.vocab_size_wanted, min_frequency=self.min_frequency,
                                      special_tokens=list(SPECIALS), show_progress=False)
        tok.train_from_iterator((self.normalize(t) for t in items), trainer=trainer)
        self._tok = tok

    def encode(self, item: str) -> Tensor:
        return torch.tensor(self._tok.encode(self.normalize(item)).ids, dtype=torch.long)

    def encode_batch(self, items: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch_fast([self.normalize(item) for item in items])]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(self._content(ids), skip_special_tokens=False).replace("<unk>", "⁇")

    def pieces(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"json": self._tok.to_str()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_str(state["json"])


@TOKENIZERS.register("sentencepiece")
class SentencePieceTokenizer(_TextTokenizer):
    """SentencePiece (unigram by default) trained in memory; the model travels in the checkpoint as text."""

    def __init__(self, vocab_size: int = 8000, model_type: str = "unigram", character_coverage: float = 0.9995,
                 normalization: str = "NFKC") -> None:
        super().__init__(normalization)
        self.check_vocab_size(vocab_size)
        self.vocab_size_wanted, self.model_type, self.coverage = vocab_size, model_type, character_coverage
        self._sp: Any = None
        self._model = b""

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def fit(self, items: list[str]) -> None:
        import sentencepiece as spm

        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=(self.normalize(t) for t in items), model_writer=model,
            vocab_size=self.vocab_size_wanted, model_type=self.model_type, character_coverage=self.coverage,
            pad_id=0, bos_id=1, eos_id=2, unk_id=3, normalization_rule_name="identity", hard_vocab_limit=False,
            minloglevel=2)
        self._load(model.getvalue())

    def _load(self, model: bytes) -> None:
        import sentencepiece as spm

        self._model, self._sp = model, spm.SentencePieceProcessor(model_proto=model)

    def encode(self, item: str) -> Tensor:
        return torch.tensor(self._sp.encode(self.normalize(item)), dtype=torch.long)

    def encode_batch(self, items: list[str]) -> list[list[int]]:
        return self._sp.encode([self.normalize(item) for item in items])

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(self._content(ids))

    def pieces(self, ids: list[int]) -> list[str]:
        return [self._sp.id_to_piece(i) for i in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"model": base64.b64encode(self._model).decode("ascii")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._load(base64.b64decode(state["model"]))


class _VocabTokenizer(_TextTokenizer):
    """A fixed list of units (characters or words) kept by frequency; others map to <unk>."""

    def __init__(self, max_vocab: int, min_frequency: int, normalization: str) -> None:
        super().__init__(normalization)
        self.check_vocab_size(max_vocab)
        self.max_vocab, self.min_frequency = max_vocab, min_frequency
        self.itos: list[str] = list(SPECIALS)
        self.stoi: dict[str, int] = {}

    def units(self, text: str) -> list[str]:
        raise NotImplementedError

    def join(self, units: list[str]) -> str:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def fit(self, items: list[str]) -> None:
        counts = Counter(u for t in items for u in self.units(self.normalize(t)))
        kept = [u for u, n in counts.most_common(self.max_vocab - len(SPECIALS)) if n >= self.min_frequency]
        self.load_state_dict({"itos": [*SPECIALS, *kept]})

    def encode(self, item: str) -> Tensor:
        return torch.tensor([self.stoi.get(u, self.unk_id) for u in self.units(self.normalize(item))])

    def decode(self, ids: list[int]) -> str:
        return self.join([self.itos[i] if i != self.unk_id else "⁇" for i in self._content(ids)])

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"itos": list(self.itos)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.itos = list(state["itos"])
        self.stoi = {u: i for i, u in enumerate(self.itos)}


@TOKENIZERS.register("char")
class CharTokenizer(_VocabTokenizer):
    def __init__(self, max_vocab: int = 4000, min_frequency: int = 1, normalization: str = "NFKC") -> None:
        super().__init__(max_vocab, min_frequency, normalization)

    def units(self, text: str) -> list[str]:
        return list(text)

    def join(self, units: list[str]) -> str:
        return "".join(units)


WORD = re.compile(r"\w+|[^\w\s]")


@TOKENIZERS.register("word")
class WordTokenizer(_VocabTokenizer):
    """Words and punctuation marks; decoding joins with spaces (not a faithful detokenizer)."""

    lossless = False

    def __init__(self, max_vocab: int = 16000, min_frequency: int = 1, normalization: str = "NFKC") -> None:
        super().__init__(max_vocab, min_frequency, normalization)

    def units(self, text: str) -> list[str]:
        return WORD.findall(text)

    def join(self, units: list[str]) -> str:
        return " ".join(units)
