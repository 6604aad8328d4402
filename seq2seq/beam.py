"""Batched beam search on the KV cache, with n-best lists, length normalization and guides (prefixes, required
and excluded phrases).

Shapes: B batch, K beam, N n-best, L decoded length, V output vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seq2seq.guides import Guide, Guides
from seq2seq.linear import packed_weights
from seq2seq.model import EncoderDecoder
from seq2seq.search import Hypotheses, banned_ids, next_logits


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
    banned = banned_ids(allowed)
    guided = None if guides is None else Guides(guides, K, eos, src.device)
    constrained = guided is not None and guided.has_include
    with packed_weights(B * K):
        for t in range(max_len):
            logits = next_logits(model, tokens, memory, src_keep, state, banned, no_repeat_ngram, guided).float()
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
