"""Decoding over the encoder-decoder: greedy, sampling, batched beam search on the KV cache, and one-shot.

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

from seq2seq.domain import Tokenizer
from seq2seq.errors import ConfigError
from seq2seq.guides import Guide, Guides
from seq2seq.linear import packed_weights
from seq2seq.model import DecoderState, EncoderDecoder
from seq2seq.schema import check, setting


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


def max_length(src_keep: Tensor, a: float, b: int) -> int:
    """Decoding budget a · (longest source in the batch) + b, at least one step."""
    return max(1, int(a * int(src_keep.sum(1).max()) + b))


def repeated_ngram_mask(tokens: Tensor, n: int, vocab: int) -> Tensor:
    """(B, V) True where emitting the token would repeat an n-gram already in `tokens` (B, t)."""
    B, t = tokens.shape
    banned = torch.zeros(B, vocab, device=tokens.device)
    if n <= 0 or t < n:
        return banned.bool()
    windows = tokens.unfold(1, n, 1)  # (B, t - n + 1, n)
    match = (windows[..., :-1] == tokens[:, None, t - n + 1 :]).all(-1)  # (B, t - n + 1): same n-1 prefix
    return banned.scatter_add_(1, windows[..., -1], match.float()) > 0


def _next_logits(model: EncoderDecoder, tokens: Tensor, memory: Tensor, src_keep: Tensor,
                 state: DecoderState | None, banned: Tensor | None, no_repeat: int = 0,
                 guides: Guides | None = None) -> Tensor:
    """Logits (B, V) for the position after `tokens` (B, 1 + t), through the cache when there is one.

    With `guides`, log-probabilities instead (normalized over what `banned` and `no_repeat` leave, before the
    guides' own bans); a row whose prefix forces this position has one finite entry, its forced token's
    log-probability, whatever else bans it."""
    if state is not None:
        logits = model.decode_step(tokens[:, -1], state)
    else:
        keep = torch.ones_like(tokens, dtype=torch.bool)
        logits = model.head(model.decode(tokens, memory, src_keep, keep)[:, -1])
    forced = None if guides is None else guides.forced(tokens.shape[1] - 1)
    if forced is not None:
        raw = logits[forced].float()  # (M,) the forced tokens' logits, before any ban
    # The logits are this step's own output, so they are masked in place.
    if no_repeat:
        logits.masked_fill_(repeated_ngram_mask(tokens[:, 1:], no_repeat, logits.shape[-1]), float("-inf"))
    if banned is not None:
        logits.index_fill_(-1, banned, float("-inf"))
    if guides is None:
        return logits
    logp = logits.float().log_softmax(-1)
    guides.ban(logp, tokens[:, 1:])
    if forced is not None:
        rows = forced[0]
        lse = logits[rows].float().logsumexp(-1)
        logp[rows] = float("-inf")
        logp[forced] = (raw - lse).masked_fill(guides.free[rows] > tokens.shape[1] - 1, 0.0)
    return logp


def _banned(allowed: Tensor | None) -> Tensor | None:
    """The token ids outside an `allowed` (V,) mask: filling their columns touches only those."""
    return None if allowed is None else (~allowed).nonzero()[:, 0]


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
    banned = _banned(allowed)
    guided = None if guides is None else Guides(guides, 1, eos, src.device)
    with packed_weights(B):  # 1.15-1.35x greedy tokens/s on the small preset (benchmarks/decode_fast_paths.py)
        for _ in range(max_len):
            logits = _next_logits(model, tokens, memory, src_keep, state, banned, no_repeat_ngram, guided)  # (B, V)
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


@dataclass
class Hypotheses:
    """The n-best of a beam search, best first: tokens (B, N, L) EOS-padded, scores (B, N) after length penalty."""

    tokens: Tensor
    scores: Tensor


@torch.no_grad()
def beam_search(  # noqa: PLR0913 - the search's inputs, all keyword-only past the model's
    model: EncoderDecoder,
    src: Tensor,
    src_keep: Tensor,
    *,
    bos: int,
    eos: int,
    max_len: int,
    beam: int,
    n_best: int = 1,
    length_penalty: float = 0.0,
    length_normalization: str = "gnmt",
    allowed: Tensor | None = None,
    use_cache: bool = True,
    no_repeat_ngram: int = 0,
    guides: list[Guide] | None = None,
) -> Hypotheses:
    """Batched beam search; the score of a hypothesis is its summed token log-probability.

    The standard search (fairseq, Marian, CTranslate2, transformers): each step ranks the 2K best continuations of
    a source's K live hypotheses. Those that end (EOS) among the first K ranks leave the beam for the source's store
    of its K best finished hypotheses, ranked by score / ((5 + length) / 6) ** length_penalty (GNMT), or by
    score / length with `length_normalization="average"` (length counts the EOS); the K best of the others stay
    live. A source is done once its store is full and its best live hypothesis, normalized at its current length,
    ranks below the store's worst (exact when scores are not normalized: they only fall); at `max_len` the K best
    ranked continuations end whatever they are. With `length_normalization="average"` this is transformers'
    `generate(num_beams=K, length_penalty=1.0)` token for token, wherever the tokens a search never emits (PAD)
    have no probability to speak of: a token's log-probability here (and in CTranslate2) is normalized over the
    tokens the search may emit, and in transformers over all of them.

    `guides` (one per source, see `seq2seq.guides`) force prefixes and require or exclude phrases; required phrases
    allocate the beam across banks of constraint progress (EOS waits until they are met), and a hypothesis that
    meets all of its constraints ranks above any that does not.
    """
    if not 1 <= n_best <= beam:
        raise ValueError(f"n_best ({n_best}) must be between 1 and the beam size ({beam})")
    B, K, device = src.shape[0], beam, src.device
    memory = model.encode(src, src_keep)  # (B, S, D)
    state = model.start_decoding(memory, src_keep, max_len, beam=K) if use_cache else None
    if not use_cache:  # the uncached decoder takes one memory row per hypothesis
        memory, src_keep = memory.repeat_interleave(K, dim=0), src_keep.repeat_interleave(K, dim=0)  # (B*K, ...)
    tokens = torch.full((B * K, 1), bos, dtype=torch.long, device=device)  # (B*K, 1 + t) live hypotheses
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # every beam starts as the same empty hypothesis: expand only one
    store = _Finished(B, K, max_len, eos, length_penalty, length_normalization, device)
    banned = _banned(allowed)
    guided = None if guides is None else Guides(guides, K, eos, src.device)
    constrained = guided is not None and guided.has_include
    with packed_weights(B * K):
        for t in range(max_len):
            logits = _next_logits(model, tokens, memory, src_keep, state, banned, no_repeat_ngram, guided).float()
            top, token = logits.topk(min(2 * K, logits.shape[-1]))  # (B*K, k): only these can rank
            cand = top if guided is not None else top - logits.logsumexp(-1, keepdim=True)
            if constrained:
                token, cand = guided.candidates(logits, token, cand)
            k = cand.shape[-1]
            total = (scores.view(-1, 1) + cand).view(B, K * k)
            flat_token = token.view(B, K * k)
            if t < max_len - 1:  # at max_len, the K best end whatever they are
                total = store.take_ended(tokens, total, flat_token, k)
            if constrained:
                best = guided.select(total, token, K)  # (B, K)
                scores = total.gather(1, best)
            else:
                scores, best = total.topk(K, dim=-1)  # (B, K)
            rows = (torch.arange(B, device=device)[:, None] * K + best // k).view(-1)  # (B*K,) source beams
            tokens = torch.cat([tokens[rows], flat_token.gather(1, best).view(-1, 1)], dim=1)
            if state is not None:
                state.reorder(rows)
            store.stop_beaten(scores, t + 1)
            if bool(store.done.all()):
                break
    if not bool(store.done.all()):  # max_len: the live hypotheses end where they are
        store.end(tokens[:, 1:].view(B, K, -1), scores, guided.complete().view(B, K) if constrained else None)
    return store.best(n_best)


class _Finished:
    """Each source's K best finished hypotheses: tokens (B, K, max_len) EOS-padded, normalized scores (B, K), and
    whether each met its constraints (those rank first)."""

    def __init__(self, B: int, K: int, max_len: int, eos: int, length_penalty: float, normalization: str,
                 device: torch.device) -> None:
        self.eos, self.alpha, self.average = eos, length_penalty, normalization == "average"
        self.tokens = torch.full((B, K, max_len), eos, dtype=torch.long, device=device)
        self.scores = torch.full((B, K), float("-inf"), device=device)
        self.met = torch.ones(B, K, dtype=torch.bool, device=device)
        self.done = torch.zeros(B, dtype=torch.bool, device=device)  # no later hypothesis may enter

    def _norm(self, length: Tensor) -> Tensor:
        return length if self.average else ((5.0 + length) / 6.0) ** self.alpha

    def add(self, tokens: Tensor, raw: Tensor, ends: Tensor, length: Tensor | int, met: Tensor | None = None) -> None:
        """Hypotheses tokens (B, K, L) with summed log-probabilities raw (B, K); those where `ends` enter the
        store when they rank among its K best (EOS is appended where L leaves room)."""
        norm = self._norm(torch.as_tensor(length, device=raw.device).float())
        new = torch.where(ends & ~self.done[:, None], raw / norm, float("-inf"))  # (B, K)
        padded = torch.full_like(self.tokens, self.eos)
        padded[..., : tokens.shape[-1]] = tokens
        met = torch.ones_like(ends) if met is None else met
        merged = torch.cat([self.scores, new], dim=1)  # (B, 2K)
        # Ties keep the earlier: finished first, then ranks in order.
        keep = _stable_top(torch.where(torch.cat([self.met, met], dim=1), merged, merged - 1e9), self.scores.shape[1])
        self.scores = merged.gather(1, keep)
        self.met = torch.cat([self.met, met], dim=1).gather(1, keep)
        self.tokens = torch.cat([self.tokens, padded], dim=1).gather(1, keep[..., None].expand(-1, -1,
                                                                                              padded.shape[-1]))

    def take_ended(self, tokens: Tensor, total: Tensor, token: Tensor, k: int) -> Tensor:
        """A step's candidates, scores total (B, K · k) and tokens (B, K · k) over the live hypotheses tokens
        (B · K, 1 + t): those among the first K ranks that end (EOS) enter the store; the scores returned leave every
        EOS candidate out, for the others to compete for the beam."""
        B, K = self.scores.shape
        ranked = total.topk(min(K, total.shape[1]), dim=-1).indices  # (B, K)
        ends = token.gather(1, ranked) == self.eos
        if bool(ends.any()):
            parents = (torch.arange(B, device=total.device)[:, None] * K + ranked // k).view(-1)
            t = tokens.shape[1] - 1
            self.add(tokens[parents, 1:].view(B, ranked.shape[1], t), total.gather(1, ranked), ends, t + 1)
        return total.masked_fill(token == self.eos, float("-inf"))

    def end(self, live: Tensor, scores: Tensor, met: Tensor | None) -> None:
        """The live hypotheses (B, K, L) with their scores (B, K), ended where they are (EOS or not)."""
        eos = self.eos
        length = ((live != eos).cumprod(-1).sum(-1) + (live == eos).any(-1).long()).clamp(min=1)  # incl. EOS
        self.add(live, scores, torch.ones_like(scores, dtype=torch.bool), length, met)

    def stop_beaten(self, live: Tensor, length: int) -> None:
        """A source is done when its store is full and its best live score (B, K), normalized at `length`, is no
        better than the store's worst."""
        best = live.max(-1).values / self._norm(torch.tensor(float(length), device=live.device))
        self.done |= self.scores.isfinite().all(-1) & (best <= self.scores.min(-1).values)

    def best(self, n: int) -> Hypotheses:
        order = _stable_top(torch.where(self.met, self.scores, self.scores - 1e9), n)  # (B, N)
        tokens = self.tokens.gather(1, order[..., None].expand(-1, -1, self.tokens.shape[-1]))  # (B, N, max_len)
        width = int((tokens != self.eos).sum(-1).max()) + 1
        return Hypotheses(tokens[..., : min(width, tokens.shape[-1])], self.scores.gather(1, order))


def _stable_top(values: Tensor, k: int) -> Tensor:
    """Indices (B, k) of the k largest values of each row, ties in their order."""
    return values.argsort(dim=-1, descending=True, stable=True)[:, :k]


def strip(tokens: Tensor, eos: int) -> list[list[int]]:
    """(B, L) decoded tokens -> one list per row, cut before the first EOS."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out


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
        """The decoder input (B, L) under which position k predicts tokens[:, k]: BOS + tokens[:, :-1], or BOS at
        every position in one-shot mode."""
        if self.spec.one_shot:
            return torch.full_like(tokens, self.bos)
        return torch.cat([torch.full_like(tokens[:, :1], self.bos), tokens[:, :-1]], dim=1)

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
