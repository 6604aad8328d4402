"""Autoregressive decoding over the encoder-decoder: greedy, sampling and batched beam search on the KV cache.

Shapes: B batch, S source length, K beam, N n-best, L decoded length, V output vocabulary.
Search loops call `EncoderDecoder.decode_step`; the uncached path recomputes the whole prefix each step and exists
to prove the cache exact. A label domain passes `allowed` (V,) to restrict the search to its label set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from seq2seq.errors import ConfigError
from seq2seq.linear import packed_weights
from seq2seq.model import DecoderState, EncoderDecoder


@dataclass
class DecodeSpec:
    """The `decode:` config block: at most a · source_length + b output tokens."""

    max_len_a: float = 1.0
    max_len_b: int = 10
    beam: int = 1  # 1 = greedy search
    one_shot: bool = False  # decode all max_len positions in one pass from BOS inputs (label domains)
    length_penalty: float = 0.0  # GNMT alpha: final scores are divided by ((5 + length) / 6) ** alpha
    length_normalization: str = "gnmt"  # gnmt (uses length_penalty) | average (score per token)
    no_repeat_ngram: int = 0  # > 0: never emit a token that repeats an n-gram of this size
    sampling: bool = False  # sample instead of searching (with temperature, top_k, top_p)
    temperature: float = 1.0
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus: smallest set of tokens whose probability reaches top_p

    def __post_init__(self) -> None:
        if self.length_normalization not in ("gnmt", "average"):
            raise ConfigError(f"`decode.length_normalization` must be gnmt or average, "
                              f"got {self.length_normalization!r}")
        if self.temperature <= 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.beam < 1:
            raise ConfigError("need decode.temperature > 0, 0 < decode.top_p <= 1, decode.top_k >= 0, decode.beam >= 1")


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
                 state: DecoderState | None, banned: Tensor | None, no_repeat: int = 0) -> Tensor:
    """Logits (B, V) for the position after `tokens` (B, 1 + t), through the cache when there is one."""
    if state is not None:
        logits = model.decode_step(tokens[:, -1], state)
    else:
        keep = torch.ones_like(tokens, dtype=torch.bool)
        logits = model.head(model.decode(tokens, memory, src_keep, keep)[:, -1])
    # The logits are this step's own output, so they are masked in place.
    if no_repeat:
        logits.masked_fill_(repeated_ngram_mask(tokens[:, 1:], no_repeat, logits.shape[-1]), float("-inf"))
    return logits if banned is None else logits.index_fill_(-1, banned, float("-inf"))


def _banned(allowed: Tensor | None) -> Tensor | None:
    """The token ids outside an `allowed` (V,) mask; filling those columns costs less than masking all V when few
    are banned (EOS, to force a length)."""
    return None if allowed is None else (~allowed).nonzero()[:, 0]


def _topk(x: Tensor, k: int, block: int = 64) -> tuple[Tensor, Tensor]:
    """`x.topk(k)` over the last dim of x (R, V) by way of block maxima: the k best values lie in the k blocks with
    the best maxima (each of those holds a value at least as good), so only those blocks and the tail are ranked.
    """
    R, V = x.shape
    n = V // block
    if n <= k:
        return x.topk(k)
    blocks = x[:, : n * block].reshape(R, n, block)
    best = blocks.amax(-1).topk(k).indices  # (R, k)
    tail = x[:, n * block :]
    cand = torch.cat([blocks.gather(1, best[..., None].expand(R, k, block)).view(R, k * block), tail], dim=1)
    values, pos = cand.topk(k)  # (R, k): positions among the k blocks, then the tail
    in_block = best.gather(1, (pos // block).clamp(max=k - 1)) * block + pos % block
    return values, torch.where(pos < k * block, in_block, pos + (n - k) * block)


def _logsumexp_(logits: Tensor, row_max: Tensor) -> Tensor:
    """log Σ exp over the rows of logits (B, V) with their maxima (B, 1), computed in place: logits are consumed."""
    return logits.sub_(row_max).exp_().sum(-1, keepdim=True).log_().add_(row_max)  # (B, 1)


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
) -> Tensor:
    """Greedy search (or sampling, given `sampler`): tokens (B, L) without BOS, L <= max_len; positions after a
    row's EOS hold EOS.

    `allowed` is a boolean (V,) mask of tokens the search may emit (EOS must be among them).
    """
    memory = model.encode(src, src_keep)  # (B, S, D)
    B = src.shape[0]
    tokens = torch.full((B, 1), bos, dtype=torch.long, device=src.device)  # (B, 1 + L)
    done = torch.zeros(B, dtype=torch.bool, device=src.device)
    state = model.start_decoding(memory, src_keep, max_len) if use_cache else None
    choose = sampler or (lambda logits: logits.max(-1).indices)  # max: faster than argmax on CPU
    banned = _banned(allowed)
    with packed_weights(B):
        for _ in range(max_len):
            logits = _next_logits(model, tokens, memory, src_keep, state, banned, no_repeat_ngram)  # (B, V)
            nxt = choose(logits).masked_fill(done, eos)  # (B,)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            done |= nxt == eos
            if bool(done.all()):
                break
    return tokens[:, 1:]


def one_shot_input(like: Tensor, bos: int) -> Tensor:
    """Decoder input of one-shot mode: BOS at every position, so each position predicts from memory alone."""
    return torch.full_like(like, bos)


@torch.no_grad()
def one_shot(model: EncoderDecoder, src: Tensor, src_keep: Tensor, *, bos: int, length: int,
             allowed: Tensor | None = None) -> Tensor:
    """All `length` positions in one decoder pass: tokens (B, L). Pairs with models trained in one-shot mode."""
    tgt_in = one_shot_input(torch.empty(src.shape[0], length, dtype=torch.long, device=src.device), bos)
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
) -> Hypotheses:
    """Batched beam search; the score of a hypothesis is its summed token log-probability.

    A finished hypothesis (it emitted EOS) keeps its score and competes with the live ones; it can only be extended
    by EOS at no cost. The final beam is re-ranked by score / ((5 + length) / 6) ** length_penalty (GNMT), or by
    score / length with `length_normalization="average"`; length counts the EOS.
    """
    if not 1 <= n_best <= beam:
        raise ValueError(f"n_best ({n_best}) must be between 1 and the beam size ({beam})")
    B, K = src.shape[0], beam
    memory = model.encode(src, src_keep)  # (B, S, D)
    state = model.start_decoding(memory, src_keep, max_len, beam=K) if use_cache else None
    if not use_cache:  # the uncached decoder takes one memory row per hypothesis
        memory, src_keep = memory.repeat_interleave(K, dim=0), src_keep.repeat_interleave(K, dim=0)  # (B*K, ...)
    tokens = torch.full((B * K, 1), bos, dtype=torch.long, device=src.device)  # (B*K, 1 + t)
    scores = torch.full((B, K), float("-inf"), device=src.device)
    scores[:, 0] = 0.0  # every beam starts as the same empty hypothesis: expand only one
    done = torch.zeros(B * K, dtype=torch.bool, device=src.device)
    banned = _banned(allowed)
    with packed_weights(B * K):
        for _ in range(max_len):
            logits = _next_logits(model, tokens, memory, src_keep, state, banned, no_repeat_ngram).float()  # (B*K, V)
            # Only a hypothesis's K best tokens can enter the beam: rank those, as log-probabilities. A finished
            # hypothesis has one continuation, EOS at no cost.
            top, token = _topk(logits, min(K, logits.shape[-1]))  # (B*K, k)
            cand = top - _logsumexp_(logits, top[:, :1])
            cand = cand.masked_fill(done[:, None], float("-inf"))
            cand[:, 0].masked_fill_(done, 0.0)
            token = token.masked_fill(done[:, None], eos)
            k = cand.shape[-1]
            scores, best = (scores.view(-1, 1) + cand).view(B, K * k).topk(K, dim=-1)  # (B, K)
            rows = (torch.arange(B, device=src.device)[:, None] * K + best // k).view(-1)  # (B*K,) source beams
            nxt = token.view(B, K * k).gather(1, best).view(-1)
            tokens = torch.cat([tokens[rows], nxt[:, None]], dim=1)
            done = done[rows] | (nxt == eos)
            if state is not None:
                state.reorder(rows)
            if bool(done.all()):
                break
    out = tokens[:, 1:].view(B, K, -1)  # (B, K, L)
    length = ((out != eos).cumprod(-1).sum(-1) + (out == eos).any(-1).long()).clamp(min=1)  # tokens incl. EOS
    norm = length if length_normalization == "average" else ((5.0 + length) / 6.0) ** length_penalty
    final = scores / norm
    order = final.argsort(dim=-1, descending=True)[:, :n_best]  # (B, N)
    return Hypotheses(out.gather(1, order[..., None].expand(-1, -1, out.shape[-1])), final.gather(1, order))


def strip(tokens: Tensor, eos: int) -> list[list[int]]:
    """(B, L) decoded tokens -> one list per row, cut before the first EOS."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out
