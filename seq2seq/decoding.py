"""Decoding over the encoder-decoder: greedy, sampling and one-shot here, beam search in `seq2seq.beam`.

Shapes: B batch, S source length, K beam, N n-best, L decoded length, V output vocabulary, C labels.
`Decoder` is the one decoding path: built from the `decode:` spec and the target vocabulary, it serves validation,
`evaluate`, `predict`, `translate` and the Python API. Search loops call `EncoderDecoder.decode_step`; the uncached
path recomputes the whole prefix each step and exists to prove the cache exact. `allowed` (V,) restricts a search to
the tokens it may emit: never PAD or BOS, and only the labels of a label domain.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from torch import Tensor

from seq2seq.beam import beam_search
from seq2seq.domain import Tokenizer
from seq2seq.errors import ConfigError
from seq2seq.guides import Guide, Guides
from seq2seq.linear import packed_weights
from seq2seq.model import EncoderDecoder
from seq2seq.schema import check, setting
from seq2seq.search import Hypotheses, banned_ids, max_length, next_logits


@dataclass(frozen=True)
class DecodeSpec:
    """The `decode:` config block: at most a · source_length + b output tokens."""

    block: ClassVar[str] = "decode"
    max_len_a: float = setting(1.0, "at most a · source length + b output tokens: a", minimum=0)
    max_len_b: int = setting(10, "at most a · source length + b output tokens: b", minimum=0)
    beam: int = setting(1, "beam size; 1 = greedy search", minimum=1)
    one_shot: bool = setting(False, "decode all positions in one pass from BOS inputs (label domains)")
    length_penalty: float = setting(0.0, "GNMT alpha: final scores are divided by ((5 + length) / 6) ** alpha")
    length_normalization: str = setting("gnmt", "gnmt (uses length_penalty) or average (score per token)",
                                        choices=("gnmt", "average"))
    no_repeat_ngram: int = setting(0, "> 0: never emit a token that repeats an n-gram of this size", minimum=0)
    sampling: bool = setting(False, "sample instead of searching (with temperature, top_k, top_p)")
    temperature: float = setting(1.0, "sampling temperature (> 0)", minimum=1e-6)
    top_k: int = setting(0, "sample among the k most likely tokens; 0 = no limit", minimum=0)
    top_p: float = setting(1.0, "nucleus: the smallest set of tokens whose probability reaches top_p", minimum=1e-6)

    def __post_init__(self) -> None:
        check(self)
        if self.top_p > 1:
            raise ConfigError(f"`decode.top_p` must be at most 1, got {self.top_p}")


def sample_from(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row of logits (B, V) after temperature, top-k and nucleus (top-p) filtering."""
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        outside = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is complete
        logits = logits.masked_fill(outside.scatter(1, order, outside), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]  # (B,)


@torch.no_grad()
def greedy(  # noqa: PLR0913 - the search's inputs, all keyword-only past the model's
    model: EncoderDecoder,
    src: Tensor,
    src_keep: Tensor,
    *,
    bos: int,
    eos: int,
    max_len: int,
    allowed: Tensor | None = None,
    use_cache: bool = True,
    no_repeat_ngram: int = 0,
    sampler: Callable[[Tensor], Tensor] | None = None,
    guides: list[Guide] | None = None,
) -> Tensor:
    """Greedy search (or sampling, given `sampler`): tokens (B, L) without BOS, L <= max_len; positions after a
    row's EOS hold EOS.

    `allowed` is a boolean (V,) mask of tokens the search may emit (EOS must be among them). `guides` (one per
    source) force prefixes and exclude phrases; required phrases need `beam_search`.
    """
    if guides is not None and any(g.include for g in guides):
        raise ValueError("required phrases (`Guide.include`) are searched for by beam_search")
    memory = model.encode(src, src_keep)  # (B, S, D)
    B = src.shape[0]
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=src.device)  # (B, 1 + L)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    state = model.start_decoding(memory, src_keep, max_len) if use_cache else None
    choose = sampler or (lambda logits: logits.argmax(-1))
    banned = banned_ids(allowed)
    guided = None if guides is None else Guides(guides, 1, eos, src.device)
    with packed_weights(B):  # 1.15-1.35x greedy tokens/s on the small preset (benchmarks/decode_fast_paths.py)
        for _ in range(max_len):
            logits = next_logits(model, tokens, memory, src_keep, state, banned, no_repeat_ngram, guided)  # (B, V)
            nxt = choose(logits).masked_fill(done, eos)  # (B,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
    return tokens[:, 1:]


@torch.no_grad()
def one_shot(model: EncoderDecoder, src: Tensor, src_keep: Tensor, *, bos: int, length: int,
             allowed: Tensor | None = None) -> Tensor:
    """All `length` positions in one decoder pass: tokens (B, L). Pairs with models trained in one-shot mode."""
    tgt_in = torch.full((src.shape[0], length), bos, dtype=torch.long, device=src.device)  # each position sees BOS
    logits = model(src, src_keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool))  # (B, L, V)
    return logits.argmax(-1) if allowed is None else logits.masked_fill(~allowed, float("-inf")).argmax(-1)


def teacher_input(tokens: Tensor, bos: int, one_shot: bool = False) -> Tensor:
    """The decoder input (B, L) under which position k predicts tokens[:, k] (teacher forcing): BOS then
    tokens[:, :-1], the targets shifted right; BOS at every position in one-shot mode (every label at once)."""
    if one_shot:
        return torch.full_like(tokens, bos)
    return torch.cat([torch.full_like(tokens[:, :1], bos), tokens[:, :-1]], dim=1)


@dataclass(frozen=True)
class Decoder:
    """What `decode:` asks for (greedy, beam, sampling or one-shot), over a target vocabulary.

    A search never emits PAD or BOS; over a closed label set (`label_ids`) it emits nothing but labels.
    """

    spec: DecodeSpec
    bos: int
    eos: int
    pad: int
    vocab_size: int
    label_ids: tuple[int, ...] | None = None
    max_positions: int | None = None  # the model's: no search runs longer
    forced: tuple[int, ...] = ()  # the target tokenizer's `forced_prefix`: every output starts with it

    @classmethod
    def for_tokenizer(cls, spec: DecodeSpec, tok: Tokenizer, max_positions: int | None = None) -> Decoder:
        labels = None if tok.label_ids is None else tuple(tok.label_ids)
        return cls(spec, tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size, labels, max_positions,
                   tuple(tok.forced_prefix))

    def steer(self, n: int, guides: list[Guide] | None) -> list[Guide] | None:
        """The guides of `n` sources with the forced prefix (unscored) in front of their own prefixes."""
        if not self.forced:
            return guides
        return [dataclasses.replace(g, prefix=self.forced + g.prefix, free=len(self.forced))
                for g in guides or [Guide()] * n]

    def allowed(self, device: torch.device) -> Tensor:
        """(V,) True for the tokens a search may emit."""
        if self.label_ids is not None:
            mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=device)
            mask[list(self.label_ids)] = True
            return mask
        mask = torch.ones(self.vocab_size, dtype=torch.bool, device=device)
        mask[[self.pad, self.bos]] = False
        mask[self.eos] = True  # a decoder may start from EOS (NLLB)
        return mask

    def teacher_input(self, tokens: Tensor) -> Tensor:
        """The decoder input (B, L) under which position k predicts tokens[:, k] in this decoding mode."""
        return teacher_input(tokens, self.bos, self.spec.one_shot)

    def max_len(self, src_keep: Tensor, guides: list[Guide] | None = None) -> int:
        """The decoding budget; with guides, room for the longest prefix and then every required token; never more
        than the model's positions."""
        budget = max_length(src_keep, self.spec.max_len_a, self.spec.max_len_b)
        if guides:
            budget = max(budget, 1 + max(len(g.prefix) for g in guides)) + max(g.required_tokens for g in guides)
        return budget if self.max_positions is None else min(budget, self.max_positions)

    def __call__(self, model: EncoderDecoder, src: Tensor, src_keep: Tensor,
                 guides: list[Guide] | None = None) -> Tensor:
        """The best output of each source: tokens (B, L) without BOS; positions after a row's EOS hold EOS.

        `guides` (one per source) force prefixes and require or exclude phrases; required phrases are searched for
        by beam search (at `decode.beam`, even 1)."""
        spec = self.spec
        guides = self.steer(src.shape[0], guides)
        max_len = self.max_len(src_keep, guides)
        allowed = self.allowed(src.device)
        if spec.one_shot:
            if guides:
                raise ConfigError("prefixes and constraints steer autoregressive decoding; "
                                  "`decode.one_shot=true` decodes every position at once")
            return one_shot(model, src, src_keep, bos=self.bos, length=max_len, allowed=allowed)
        if not spec.sampling and (spec.beam > 1 or (guides and any(g.include for g in guides))):
            return self._n_best(model, src, src_keep, 1, guides).tokens[:, 0]
        sampler = partial(sample_from, temperature=spec.temperature, top_k=spec.top_k,
                          top_p=spec.top_p) if spec.sampling else None
        if sampler and guides and any(g.include for g in guides):
            raise ConfigError("required phrases are searched for by beam search; they need `decode.sampling=false`")
        return greedy(model, src, src_keep, bos=self.bos, eos=self.eos, max_len=max_len, allowed=allowed,
                      no_repeat_ngram=spec.no_repeat_ngram, sampler=sampler, guides=guides)

    def n_best(self, model: EncoderDecoder, src: Tensor, src_keep: Tensor, n: int,
               guides: list[Guide] | None = None) -> Hypotheses:
        """The `n` best outputs of each source by beam search (beam max(decode.beam, n)), with their scores."""
        spec = self.spec
        if spec.sampling or spec.one_shot:
            raise ConfigError("n-best lists and scores come from beam search; they need `decode.sampling=false` and "
                              "`decode.one_shot=false`")
        return self._n_best(model, src, src_keep, n, self.steer(src.shape[0], guides))

    def _n_best(self, model: EncoderDecoder, src: Tensor, src_keep: Tensor, n: int,
                guides: list[Guide] | None) -> Hypotheses:
        spec = self.spec
        return beam_search(model, src, src_keep, bos=self.bos, eos=self.eos, max_len=self.max_len(src_keep, guides),
                           beam=max(spec.beam, n), n_best=n, length_penalty=spec.length_penalty,
                           length_normalization=spec.length_normalization, allowed=self.allowed(src.device),
                           no_repeat_ngram=spec.no_repeat_ngram, guides=guides)

    @torch.no_grad()
    def label_probabilities(self, model: EncoderDecoder, src: Tensor, src_keep: Tensor) -> Tensor:
        """Label domains: (B, L, C) probability of each label (in `label_ids` order) at each decoded position.

        Autoregressive mode conditions position k on the decoded labels before it; one-shot mode on nothing.
        """
        if self.label_ids is None:
            raise ConfigError("label probabilities need a target tokenizer that declares `label_ids` (a label domain)")
        tgt_in = self.teacher_input(self(model, src, src_keep))  # (B, L)
        logits = model(src, src_keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool))  # (B, L, V)
        return logits[..., list(self.label_ids)].float().softmax(-1)
