"""What every search does at a step, and what searches give back: the next token's logits under the search's bans
and guides, the n-gram ban, the decoding budget, n-best hypotheses, outputs cut at EOS.

Shapes: B batch (or hypothesis rows), S source length, N n-best, L decoded length, V output vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from seq2seq.guides import Guides
from seq2seq.model import DecoderState, EncoderDecoder


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


def next_logits(model: EncoderDecoder, tokens: Tensor, memory: Tensor, src_keep: Tensor,
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


def banned_ids(allowed: Tensor | None) -> Tensor | None:
    """The token ids outside an `allowed` (V,) mask: filling their columns touches only those."""
    return None if allowed is None else (~allowed).nonzero()[:, 0]


@dataclass
class Hypotheses:
    """The n-best of a beam search, best first: tokens (B, N, L) EOS-padded, scores (B, N) after length penalty."""

    tokens: Tensor
    scores: Tensor


def strip(tokens: Tensor, eos: int) -> list[list[int]]:
    """(B, L) decoded tokens -> one list per row, cut before the first EOS."""
    out = []
    for row in tokens.tolist():
        out.append(row[: row.index(eos)] if eos in row else row)
    return out
