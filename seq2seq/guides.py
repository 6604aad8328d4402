"""Decoding under control: a forced target prefix, and lexical constraints (phrases that must or must not appear).

A `Guide` says what one input asks of its output, in target token ids; a glossary (`read_glossary`) gives each
input the target terms of the source terms it contains. `Guides` holds a batch of them as tensors
over hypothesis rows (each source's guide repeated for its K beams) and the state of each row: which required
phrases it has produced (`met`), and the one it is part-way through (`current`, `matched` tokens of it).

Positive constraints follow dynamic beam allocation (Post & Vilar 2018, "Fast Lexically Constrained Decoding with
Dynamic Beam Allocation"; batched as in Hu et al. 2019): besides each hypothesis's K best tokens, the candidates
include the tokens that advance it on a constraint; candidates are grouped into banks by how many constraint tokens
they have produced, and the beam is filled round-robin across banks, best first within each. The candidate that
has produced most always survives, so a satisfiable set of constraints is met within as many steps as it has
tokens. EOS is refused until a hypothesis has met all of its constraints. A constraint counts when its phrase
appears as consecutive tokens, once; a broken phrase starts again.

Shapes: B sources, R = B · K hypothesis rows, P required phrases, Q excluded phrases, W phrase length, n
candidates per row, V output vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from seq2seq.errors import DataError


@dataclass(frozen=True)
class Guide:
    """One input's controls: its output starts with `prefix`, contains every phrase of `include` and none of
    `exclude` (each a non-empty sequence of target token ids). The first `free` tokens of the prefix are not scored
    (a target language the tokenizer forces)."""

    prefix: tuple[int, ...] = ()
    include: tuple[tuple[int, ...], ...] = ()
    exclude: tuple[tuple[int, ...], ...] = ()
    free: int = 0

    def __post_init__(self) -> None:
        for kind in ("include", "exclude"):
            if any(len(p) == 0 for p in getattr(self, kind)):
                raise DataError(f"an `{kind}` phrase is empty (it encodes to no tokens); give it some text")

    @property
    def required_tokens(self) -> int:
        return sum(map(len, self.include))


def _padded(rows: list[list[int]], width: int, left: bool = False) -> Tensor:
    """Rows of ids -> (N, width) long, -1 where a row is shorter (on the left with `left`)."""
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            at = slice(out.shape[1] - len(row), None) if left else slice(len(row))
            out[i, at] = torch.tensor(row)
    return out


class Guides:
    """A batch of guides over R = B · `beam` hypothesis rows, and each row's progress on its constraints."""

    def __init__(self, guides: list[Guide], beam: int, eos: int, device: torch.device) -> None:
        self.eos = eos
        P = max(len(g.include) for g in guides)
        W = max((len(p) for g in guides for p in g.include), default=1)
        phrases = torch.full((len(guides), max(P, 1), W), -1, dtype=torch.long)
        for b, g in enumerate(guides):
            if g.include:
                phrases[b, : len(g.include)] = _padded([list(p) for p in g.include], W)
        Q = max(len(g.exclude) for g in guides)
        E = max((len(p) for g in guides for p in g.exclude), default=1)
        exclude = torch.stack([_padded([list(p) for p in g.exclude] + [[]] * (Q - len(g.exclude)), E, left=True)
                               for g in guides]) if Q else None  # (B, Q, E) right-aligned
        prefix = _padded([list(g.prefix) for g in guides], max(len(g.prefix) for g in guides))

        def rows(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device).repeat_interleave(beam, dim=0)

        self.phrases, self.exclude, self.prefix = rows(phrases), rows(exclude), rows(prefix)  # (R, P, W), ...
        self.free = rows(torch.tensor([g.free for g in guides]))  # (R,) unscored prefix tokens
        self.lengths = (self.phrases >= 0).sum(-1)  # (R, P); 0 for a row's unused phrase slots
        self.total = self.lengths.sum(-1)  # (R,) constraint tokens each row must produce
        self.has_include = bool(self.total.any())
        self.met = self.lengths == 0  # (R, P) unused slots count as met
        self.current = torch.full_like(self.total, -1)  # (R,) the phrase in progress, or -1
        self.matched = torch.zeros_like(self.total)  # (R,) tokens of it produced so far

    def progress(self) -> Tensor:
        """(R,) constraint tokens each row has produced."""
        return (self.lengths * self.met).sum(-1) + self.matched

    def forced(self, step: int) -> tuple[Tensor, Tensor] | None:
        """The rows whose prefix reaches position `step`, and the token each must emit there."""
        if step >= self.prefix.shape[1]:
            return None
        tok = self.prefix[:, step]
        rows = (tok >= 0).nonzero()[:, 0]
        return (rows, tok[rows]) if len(rows) else None

    def ban(self, logits: Tensor, tokens: Tensor) -> None:
        """Refuse, in logits (R, V), the tokens that would complete an excluded phrase after `tokens` (R, t), and
        EOS where required phrases are still missing."""
        if self.has_include:
            logits[:, self.eos].masked_fill_(self.progress() < self.total, float("-inf"))
        if self.exclude is None:
            return
        before, last = self.exclude[..., :-1], self.exclude[..., -1]  # (R, Q, E - 1), (R, Q)
        n = before.shape[-1]
        last_tokens = tokens[:, max(0, tokens.shape[1] - n) :] if n else tokens[:, :0]
        context = F.pad(last_tokens, (n - last_tokens.shape[1], 0), value=-2)  # (R, E - 1), -2 before the first
        hit = (((before == context[:, None]) | (before < 0)).all(-1) & (last >= 0)).nonzero()  # (M, 2) (row, phrase)
        logits[hit[:, 0], last[hit[:, 0], hit[:, 1]]] = float("-inf")

    def candidates(self, logp: Tensor, token: Tensor, score: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's top tokens (R, k) with their log-probabilities, joined by the tokens that advance it on a
        constraint (the next of the phrase in progress, else the first of each unmet phrase): (R, k + P) each,
        a repeated token's second copy at -inf."""
        first = self.phrases[..., 0].masked_fill(self.met, -1)  # (R, P)
        going = self.current >= 0
        nxt = self._expected()  # (R,)
        extra = torch.where(going[:, None], F.pad(nxt[:, None], (0, first.shape[1] - 1), value=-1), first)
        repeat = (extra[..., None] == token[:, None]).any(-1)  # (R, P) already among the top tokens
        repeat |= (extra[..., None] == extra[:, None]).tril(-1).any(-1)  # or earlier in the list
        extra_score = logp.gather(1, extra.clamp(min=0)).masked_fill(repeat | (extra < 0), float("-inf"))
        return torch.cat([token, extra.clamp(min=0)], 1), torch.cat([score, extra_score], 1)

    def _expected(self) -> Tensor:
        """(R,) the next token of each row's phrase in progress (-1 where none)."""
        cur = self.current.clamp(min=0)
        at = self.matched.clamp(max=self.phrases.shape[-1] - 1)
        expected = self.phrases[torch.arange(len(cur), device=cur.device), cur, at]
        return expected.masked_fill(self.current < 0, -1)

    def after(self, token: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The state (met (R, n, P), current (R, n), matched (R, n)) of each row after each candidate (R, n)."""
        R, n = token.shape
        met = self.met[:, None].expand(R, n, -1)
        cont = (token == self._expected()[:, None]) & (self.current[:, None] >= 0)  # continues its phrase
        cur_len = self.lengths.gather(1, self.current.clamp(min=0)[:, None])  # (R, 1)
        completes = cont & (self.matched[:, None] + 1 == cur_len)
        starts = (self.phrases[:, None, :, 0] == token[..., None]) & ~met  # (R, n, P) first token of unmet phrases
        start = starts.int().argmax(-1)  # (R, n) the first such phrase
        begins = ~cont & starts.any(-1)
        single = begins & (self.lengths.gather(1, start) == 1)
        done_phrase = torch.where(completes, self.current[:, None], torch.where(single, start, -1))  # (R, n)
        met = met | (F.one_hot(done_phrase.clamp(min=0), met.shape[-1]).bool() & (done_phrase >= 0)[..., None])
        current = torch.where(cont & ~completes, self.current[:, None], torch.where(begins & ~single, start, -1))
        matched = torch.where(cont & ~completes, self.matched[:, None] + 1, (begins & ~single).long())
        return met, current, matched

    def select(self, total: Tensor, token: Tensor, beam: int) -> Tensor:
        """Dynamic beam allocation: of the candidates with scores total (B, K · n) and tokens (R, n), the `beam`
        indices (B, K) that continue; each row's state moves to the candidate it continues."""
        B, N = total.shape
        met, current, matched = self.after(token)  # (R, n, P), (R, n), (R, n)
        made = ((self.lengths[:, None] * met).sum(-1) + matched).view(B, N)  # constraint tokens produced
        top = int(self.total.max())
        order = total.argsort(dim=-1, descending=True, stable=True)  # (B, N)
        bank = made.gather(1, order)
        onehot = F.one_hot(bank, top + 1)  # (B, N, banks)
        rank = (onehot.cumsum(1) * onehot).sum(-1) - 1  # place of each candidate within its bank, best first
        key = (rank * (top + 1) + (top - bank)).masked_fill(total.gather(1, order).isneginf(), N * (top + 1))
        best = order.gather(1, key.topk(beam, dim=-1, largest=False).indices)  # (B, K)
        flat = (torch.arange(B, device=total.device)[:, None] * N + best).view(-1)  # into (R · n)
        P = met.shape[-1]
        self.met, self.current, self.matched = met.reshape(-1, P)[flat], current.view(-1)[flat], matched.view(-1)[flat]
        return best

    def complete(self) -> Tensor:
        """(R,) True where a row has met all of its constraints."""
        return self.progress() >= self.total


@dataclass(frozen=True)
class Term:
    """A glossary entry: where `source` occurs in an input, its output must contain `target`."""

    source: str
    target: str

    def occurs_in(self, text: str) -> bool:
        """`source` in `text`, starting a word (so a term may take suffixes, and "cat" is not in "concat")."""
        return re.search(rf"(?<!\w){re.escape(self.source)}", text) is not None


def read_glossary(path: str | Path) -> list[Term]:
    """A glossary file: one `source term<TAB>target term` per line (UTF-8; blank lines skipped). A line without
    exactly one tab, or with an empty term, is a DataError naming it."""
    terms, problems = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"glossary {path}: cannot be read as UTF-8 text ({err})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) != 2:
            problems.append(f"line {number}: {len(fields) - 1} tabs, expected one (source term<TAB>target term)")
        elif not all(f.strip() for f in fields):
            problems.append(f"line {number}: empty {'source' if not fields[0].strip() else 'target'} term")
        else:
            terms.append(Term(fields[0].strip(), fields[1].strip()))
    if problems:
        raise DataError(f"glossary {path}: {len(problems)} bad line(s): " + "; ".join(problems[:10]))
    if not terms:
        raise DataError(f"glossary {path}: no terms")
    return terms


def matching_terms(sources: list[str], glossary: Sequence[Term]) -> list[list[Term]]:
    """The glossary entries whose source term occurs in each source."""
    return [[t for t in glossary if t.occurs_in(text)] for text in sources]


def term_usage(outputs: list[str], terms: list[list[Term]]) -> tuple[int, int]:
    """(used, expected): how many of each output's expected target terms it contains."""
    used = sum(t.target in out for out, expected in zip(outputs, terms, strict=True) for t in expected)
    return used, sum(map(len, terms))
