"""Inference, in one home: `Translator` turns raw sources into outputs through the module's one `Decoder`.

`Translator.from_checkpoint(path).translate([...])` needs nothing but the checkpoint, or an exported model's folder
(`seq2seq export`). Every command (`evaluate`, `predict`, `translate`, `serve`), the domains' hooks and the Python
API decode through it; `with_decoding(beam=5)` changes the decoding settings the checkpoint was trained with.

A `Backend` runs the model: `Stepped` drives the core's searches over anything with `EncoderDecoder`'s decoding
contract (the eager model, or the ONNX graphs of `seq2seq.export.onnx`); CTranslate2 runs its own searches.

Shapes: N inputs, L decoded length, C labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seq2seq.backends import Backend, Stepped
from seq2seq.data import Batch, Collate
from seq2seq.decoding import Decoder
from seq2seq.domain import Encoder, Tokenizer
from seq2seq.errors import ConfigError, DataError, some
from seq2seq.export import is_export, load_export
from seq2seq.guides import Guide, Term
from seq2seq.module import Seq2SeqModule
from seq2seq.search import strip


@dataclasses.dataclass(frozen=True)
class Translator:
    """Decodes raw sources with a module's model; `decoder` defaults to the module's (its `decode:` config) and
    `backend` to the module's eager model. An exported model's module holds its config and tokenizers, and no
    weights (they live in the backend)."""

    module: Seq2SeqModule
    batch_size: int = 64
    decoder: Decoder = None  # type: ignore[assignment]
    backend: Backend = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.decoder is None:
            object.__setattr__(self, "decoder", self.module.decoder)
        if self.backend is None:
            object.__setattr__(self, "backend", Stepped(self.module.model))

    @classmethod
    def from_checkpoint(cls, path: str | Path, batch_size: int | None = None, threads: int | None = None
                        ) -> Translator:
        """A checkpoint, or the folder of an exported model (whose engine runs `threads` CPU threads)."""
        if is_export(path):
            module, backend = load_export(path, threads)
            return cls(module, batch_size or module.config.loader.batch_size, backend=backend)
        module = Seq2SeqModule.from_checkpoint(path)
        return cls(module, batch_size or module.config.loader.batch_size)

    @classmethod
    def ensemble(cls, paths: list[str | Path], batch_size: int | None = None) -> Translator:
        """Checkpoints decoding as one model (`seq2seq.ensemble`): the mean of their log-probabilities. The first
        checkpoint's config gives the decoding settings; every member must have the same fitted tokenizers."""
        from seq2seq.ensemble import Ensemble

        modules = [Seq2SeqModule.from_checkpoint(p) for p in paths]
        first = modules[0]
        for path, module in zip(paths[1:], modules[1:], strict=True):
            if module.hparams["tokenizers"] != first.hparams["tokenizers"]:
                raise ConfigError(f"{path} and {paths[0]} have different fitted tokenizers; the members of an "
                                  "ensemble must share their vocabularies (train them with the same tokenizer "
                                  "settings on the same data)")
        backend = Stepped(Ensemble([m.model for m in modules]), f"eager ensemble of {len(modules)}")
        return cls(first, batch_size or first.config.loader.batch_size, backend=backend)

    def with_decoding(self, **changes: Any) -> Translator:
        """The same model with other `decode:` settings (e.g. `beam=5`); None leaves a setting as it is."""
        changes = {k: v for k, v in changes.items() if v is not None}
        try:
            spec = dataclasses.replace(self.decoder.spec, **changes)
        except TypeError as err:
            raise ConfigError(f"unknown decoding setting: {err}") from None
        return dataclasses.replace(self, decoder=dataclasses.replace(self.decoder, spec=spec))

    @property
    def src_tok(self) -> Encoder:
        return self.module.src_tok

    @property
    def tgt_tok(self) -> Tokenizer:
        return self.module.tgt_tok

    @torch.no_grad()
    def cross_attention(self, source: Any, target: list[int]) -> Tensor:
        """(H, T, S) the eager model's last decoder layer's cross-attention, one source, teacher-forced on `target`
        ids (of an ensemble, its first member's); T is at most the model's positions (an output that ran to the
        limit has no room for the EOS after it)."""
        module = self.module
        if any(p.is_meta for p in module.model.parameters()):  # an export's weights live in its engine
            raise ConfigError("attention maps come from the eager model: give `ckpt=` a checkpoint, not an export")
        src = self.src_tok.encode(source)[None].to(module.device)  # (1, S) or (1, S, F)
        keep = torch.ones(src.shape[:2], dtype=torch.bool, device=module.device)  # (1, S)
        target = target[: module.model.spec.max_positions]
        tgt_in = self.decoder.teacher_input(torch.tensor([target], device=module.device))  # (1, T)
        return module.model.cross_attention(src, keep, tgt_in)[0].cpu()

    def settings(self) -> dict[str, Any]:
        """The backend and every decoding setting, for outputs' metadata."""
        return {"backend": self.backend.name, **dataclasses.asdict(self.decoder.spec)}

    def encode(self, sources: list[Any]) -> list[Tensor]:
        """The encoded sources; an empty one or one longer than the model's positions is a DataError naming it."""
        module = self.module
        encoded = [module.src_tok.encode(s) for s in sources]
        limit = module.model.spec.max_positions
        bad = [i for i, s in enumerate(encoded, 1) if not 0 < len(s) <= limit]
        if bad:
            raise DataError(f"input(s) {some(bad)} (numbered from 1) are empty or longer than "
                            f"the model's {limit} positions; shorten or split them")
        return encoded

    def batches(self, sources: list[Any]) -> Iterator[tuple[list[int], Batch]]:
        """Encode raw sources and batch them by length: (input positions, batch) on the backend's device."""
        encoded = self.encode(sources)
        collate = Collate.for_tokenizers(self.module.src_tok, self.module.tgt_tok)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            yield idx, collate([(encoded[i], torch.empty(0, dtype=torch.long)) for i in idx]).to(self.backend.device)

    def guides(self, n: int, prefixes: list[str | None] | None = None, include: list[list[str]] | None = None,
               exclude: list[list[str]] | None = None, terms: list[list[Term]] | None = None) -> list[Guide]:
        """What `n` inputs ask of their outputs, from text: each output starts with its prefix (None or "": no
        prefix), contains every phrase of its `include` list and the target of every glossary term found in its
        input (`terms`, from `guides.matching_terms`), and none of its `exclude` list."""
        encode = self.module.tgt_tok.encode

        def ids(text: str | None) -> tuple[int, ...]:
            return tuple(encode(text).tolist()) if text else ()

        for name, given in (("prefixes", prefixes), ("include", include), ("exclude", exclude), ("terms", terms)):
            if given is not None and len(given) != n:
                raise DataError(f"{len(given)} {name} for {n} inputs; give one per input (None or [] for none)")
        if terms is not None:  # each phrase once
            include = [list(dict.fromkeys([*mine, *(t.target for t in found)]))
                       for mine, found in zip(include or [[]] * n, terms, strict=True)]
        guides, most = [], self.module.model.spec.max_positions - 1  # target positions after BOS
        for i in range(n):
            try:
                guide = Guide(prefix=ids(prefixes[i]) if prefixes else (),
                              include=tuple(ids(p) for p in include[i]) if include else (),
                              exclude=tuple(ids(p) for p in exclude[i]) if exclude else ())
            except DataError as err:
                raise DataError(f"input {i + 1}: {err}") from None
            needed = len(guide.prefix) + sum(map(len, guide.include))
            if needed > most:
                raise DataError(f"input {i + 1}: its prefix and include phrases take {needed} target tokens, and "
                                f"this model writes at most {most}; shorten them")
            guides.append(guide)
        return guides

    def check_glossary(self, glossary: Sequence[Term]) -> None:
        """A DataError naming the first term whose target this model cannot write (a symbol its vocabulary lacks):
        found once, before any input asks for it."""
        for i, term in enumerate(glossary, 1):
            try:
                self.guides(1, include=[[term.target]])
            except DataError as err:
                raise DataError(f"glossary term {i} ({term.source!r} -> {term.target!r}): "
                                f"{str(err).removeprefix('input 1: ')}") from None

    def tokens(self, sources: list[Any], guides: list[Guide] | None = None) -> list[list[int]]:
        """The decoded token ids of each source, cut at EOS, in input order; `guides` (one per source, see
        `guides()`) force prefixes and require or exclude phrases."""
        out: list[list[int]] = [[] for _ in sources]
        with self._inference():
            for idx, batch in self.batches(sources):
                chosen = None if guides is None else [guides[i] for i in idx]
                hyps = strip(self.backend.best(self.decoder, batch.src, batch.src_keep, chosen), self.decoder.eos)
                for i, hyp in zip(idx, hyps, strict=True):
                    out[i] = hyp
        return out

    def translate(self, sources: list[Any], guides: list[Guide] | None = None) -> list[str]:
        """The output string of each source, in input order."""
        return [self.module.tgt_tok.decode(ids) for ids in self.tokens(sources, guides)]

    def n_best(self, sources: list[Any], n: int, guides: list[Guide] | None = None) -> list[list[tuple[float, str]]]:
        """`n` (score, output) pairs per source by beam search, best first; scores are length-penalized
        log-probabilities."""
        tok, out = self.module.tgt_tok, [[] for _ in sources]
        with self._inference():
            for idx, batch in self.batches(sources):
                chosen = None if guides is None else [guides[i] for i in idx]
                found = self.backend.n_best(self.decoder, batch.src, batch.src_keep, n, chosen)
                for row, i in enumerate(idx):
                    hyps = strip(found.tokens[row], tok.eos_id)  # (N, L) -> N lists
                    out[i] = [(float(found.scores[row, k]), tok.decode(hyps[k])) for k in range(n)]
        return out

    def label_probabilities(self, sources: list[Any]) -> Tensor:
        """Label domains: (N, L, C) probability of each label per decoded position, in input order."""
        with self._inference():
            parts = [(idx, self.backend.label_probabilities(self.decoder, batch.src, batch.src_keep).cpu())
                     for idx, batch in self.batches(sources)]
        out = torch.empty(len(sources), *parts[0][1].shape[1:])
        for idx, probs in parts:
            out[idx] = probs
        return out

    def scores(self, pairs: list[tuple[Any, Any]]) -> list[list[float]]:
        """Teacher-forced log-probabilities of each target token and its EOS, for (source, target) pairs (targets
        after the tokenizer's forced prefix, which is scored too)."""
        out: list[list[float]] = [[] for _ in pairs]
        forced = list(self.decoder.forced)
        targets = [forced + self.module.tgt_tok.encode(t).tolist() for _, t in pairs]
        with self._inference():
            for idx, batch in self.batches([s for s, _ in pairs]):
                found = self.backend.score(self.decoder, batch.src, batch.src_keep, [targets[i] for i in idx])
                for i, row in zip(idx, found, strict=True):
                    out[i] = row
        return out

    @contextmanager
    def _inference(self) -> Iterator[None]:
        """The model in eval mode (dropout off) without gradients; the modes are restored afterwards."""
        modules = [m for m in (self.module, getattr(self.backend, "model", None)) if isinstance(m, torch.nn.Module)]
        modes = [m.training for m in modules]
        for m in modules:
            m.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            for m, mode in zip(modules, modes, strict=True):
                m.train(mode)
