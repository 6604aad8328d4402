"""Tokenizers of pretrained translation models, read from a Hugging Face model folder by `seq2seq import` and saved
inside the checkpoint like every tokenizer (their models and vocabularies as plain data).

`marian`: OPUS-MT's MarianTokenizer. Each side has its own SentencePiece model (source.spm, target.spm) and both
map pieces through one joint vocab.json; a piece missing from it is <unk>. Sources end with </s>; decoding starts
from <pad>. A multi-target model picks its output language with a `>>lang<<` token in front of the source: give it
as `target_lang` (or write it at the start of each source line, as with Hugging Face's tokenizer).
Unlike Hugging Face's tokenizer, no Moses punctuation normalization runs first (it runs there only when
`sacremoses` is installed).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seq2seq.domain import Tokenizer
from seq2seq.errors import ConfigError
from seq2seq.registry import TOKENIZERS
from seq2seq.schema import one_of

SIDES = ("source", "target")


def _read(folder: Path, name: str) -> bytes:
    path = folder / name
    if not path.is_file():
        needs = "tokenizer.json" if name == "tokenizer.json" else "source.spm, target.spm and vocab.json"
        raise ConfigError(f"{folder} has no {name}: this tokenizer reads {needs} from the model's folder, as "
                          "`huggingface-cli download <model> --local-dir DIR` writes it")
    return path.read_bytes()


@TOKENIZERS.register("marian")
class MarianTokenizer(Tokenizer):
    """One side of an OPUS-MT model's tokenizer; its state comes from the model's folder (`load_pretrained`), not
    from fitting."""

    def __init__(self, side: str = "source", target_lang: str | None = None) -> None:
        one_of("tokenizer side", side, SIDES)
        self.side, self.target_lang = side, target_lang
        self._sp: Any = None
        self._model, self.itos, self.stoi = b"", [], {}

    def fit(self, items: list[str]) -> None:
        raise ConfigError("the marian tokenizer is an OPUS-MT model's own: it is not fitted on data. Import the model "
                          "(`seq2seq import hf=DIR output=X.ckpt`) and start from it with `init=X.ckpt`")

    def load_pretrained(self, folder: Path) -> None:
        vocab = json.loads(_read(folder, "vocab.json"))
        itos = [""] * len(vocab)
        for piece, i in vocab.items():
            if not 0 <= i < len(vocab) or itos[i]:
                raise ConfigError(f"{folder / 'vocab.json'}: ids must be 0..{len(vocab) - 1}, each once; {piece!r} "
                                  f"has {i}")
            itos[i] = piece
        model = _read(folder, f"{self.side}.spm")
        self.load_state_dict({"spm": base64.b64encode(model).decode("ascii"), "vocab": itos})

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def _special(self, piece: str) -> int:
        if piece not in self.stoi:
            raise ConfigError(f"the Marian vocabulary has no {piece} token; is this an OPUS-MT model's vocab.json?")
        return self.stoi[piece]

    def encode(self, item: str) -> Tensor:
        return torch.tensor(self._ids(item), dtype=torch.long)

    def encode_batch(self, items: list[str]) -> list[list[int]]:
        return [self._ids(item) for item in items]

    def _ids(self, text: str) -> list[int]:
        code = []
        if text.startswith(">>") and (end := text.find("<<")) != -1:  # a language code the user wrote
            code, text = [text[: end + 2]], text[end + 2 :]
        elif self.target_lang and self.side == "source":
            code = [f">>{self.target_lang}<<"]
        pieces = code + self._sp.encode(text, out_type=str)
        ids = [self.stoi.get(p, self.unk_id) for p in pieces]
        return [*ids, self.eos_id] if self.side == "source" else ids

    def decode(self, ids: list[int]) -> str:
        special = {self.pad_id, self.eos_id, self.unk_id}
        return self._sp.decode_pieces([self.itos[i] for i in ids if i not in special]).strip()

    def pieces(self, ids: list[int]) -> list[str]:
        return [self.itos[i] for i in ids]

    def state_dict(self) -> dict[str, Any]:
        return {"spm": base64.b64encode(self._model).decode("ascii"), "vocab": list(self.itos)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        import sentencepiece as spm

        self._model = base64.b64decode(state["spm"])
        self._sp = spm.SentencePieceProcessor(model_proto=self._model)
        self.itos = list(state["vocab"])
        self.stoi = {p: i for i, p in enumerate(self.itos)}
        if self.target_lang and f">>{self.target_lang}<<" not in self.stoi:
            codes = sorted(p for p in self.itos if p.startswith(">>") and p.endswith("<<"))
            raise ConfigError(f"`target_lang={self.target_lang}`: this model's vocabulary has no >>"
                              f"{self.target_lang}<< token; it has {codes[:20] or 'none (a single-target model)'}")
        self.eos_id, self.unk_id, self.pad_id = (self._special(p) for p in ("</s>", "<unk>", "<pad>"))
        self.bos_id = self.pad_id  # Marian's decoder starts from <pad>


@TOKENIZERS.register("nllb")
class NllbTokenizer(Tokenizer):
    """One side of an NLLB-200 (or M2M-100 with an NLLB tokenizer) model's tokenizer, from its `tokenizer.json`
    (Hugging Face `tokenizers`, normalizer included). Sources are `source_lang` + pieces + </s>; decoding starts
    from </s> and every output begins with `target_lang` (`forced_prefix`), as transformers' `forced_bos_token_id`
    makes it."""

    def __init__(self, side: str = "source", source_lang: str | None = None, target_lang: str | None = None) -> None:
        one_of("tokenizer side", side, SIDES)
        for key, value in (("source_lang", source_lang), ("target_lang", target_lang)):
            if not value:
                raise ConfigError(f"the nllb tokenizer needs `{key}`, a language code such as kor_Hang or eng_Latn "
                                  f"(`seq2seq import ... {key}=...`)")
        self.side, self.source_lang, self.target_lang = side, source_lang, target_lang
        self._tok: Any = None

    def fit(self, items: list[str]) -> None:
        raise ConfigError("the nllb tokenizer is an NLLB model's own: it is not fitted on data. Import the model "
                          "(`seq2seq import hf=DIR output=X.ckpt source_lang=... target_lang=...`) and start from it "
                          "with `init=X.ckpt`")

    def load_pretrained(self, folder: Path) -> None:
        self.load_state_dict({"tokenizer": _read(folder, "tokenizer.json").decode("utf-8")})

    def state_dict(self) -> dict[str, Any]:
        return {"tokenizer": self._tok.to_str()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self._tok = HFTokenizer.from_str(state["tokenizer"])
        self.eos_id, self.pad_id, self.unk_id = (self._id(p) for p in ("</s>", "<pad>", "<unk>"))
        self.bos_id = self.eos_id  # NLLB's decoder starts from </s>
        self.source_id, target = self._id(self.source_lang), self._id(self.target_lang)
        self.forced_prefix = (target,) if self.side == "target" else ()

    def _id(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        if found is None:
            codes = sorted(t for t in self._tok.get_vocab() if len(t) == 8 and t[3] == "_")
            raise ConfigError(f"this NLLB vocabulary has no {token!r} token; its language codes include "
                              f"{codes[:12] or 'none'}")
        return found

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, item: str) -> Tensor:
        return torch.tensor(self.encode_batch([item])[0], dtype=torch.long)

    def encode_batch(self, items: list[str]) -> list[list[int]]:
        encoded = [e.ids for e in self._tok.encode_batch(items, add_special_tokens=False)]
        if self.side == "target":
            return encoded
        return [[self.source_id, *ids, self.eos_id] for ids in encoded]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def pieces(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) for i in ids]
