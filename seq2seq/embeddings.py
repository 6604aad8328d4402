"""Input side of the model: the token embedding (registered as `token`) and the positional encodings (added to
the embeddings, or, for `rope` and `alibi`, applied in self-attention: `seq2seq.attention`).

Shapes: B batch, L sequence length, D model width.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seq2seq.errors import ConfigError
from seq2seq.registry import EMBEDDINGS


@EMBEDDINGS.register("token")
class TokenEmbedding(nn.Module):
    """Token ids (B, L) -> vectors (B, L, D), scaled by √d_model as in the paper."""

    def __init__(self, vocab_size: int, d_model: int, padding_idx: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model, padding_idx=padding_idx)
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        with torch.no_grad():
            self.embed.weight[padding_idx].zero_()
        self.scale = math.sqrt(d_model)

    @property
    def weight(self) -> nn.Parameter:
        """The (V, D) table; an output head can tie its projection to it."""
        return self.embed.weight

    def forward(self, ids: Tensor) -> Tensor:
        return self.embed(ids) * self.scale  # (B, L, D)


class _Positions(nn.Module):
    max_len: int

    def check(self, length: int, offset: int) -> None:
        if offset + length > self.max_len:
            raise ConfigError(
                f"sequence of {offset + length} positions exceeds `model.max_positions` ({self.max_len}); "
                "raise `model.max_positions` or cap lengths with `loader.max_src_len` / `loader.max_tgt_len`"
            )


def sinusoid_table(d_model: int, positions: Tensor, layout: str = "paper") -> Tensor:
    """(P, D) sinusoids of `positions` (P,) in one of the layouts of `SINUSOIDS`.

    paper: PE(p, 2i) = sin(p·ω_i), PE(p, 2i+1) = cos(p·ω_i), ω_i = 10000^(-2i/D) (Vaswani et al. 2017);
    halves: the D/2 sines, then the D/2 cosines, same ω_i (Marian, and Hugging Face's conversions of it);
    fairseq: the sines, then the cosines, ω_i = 10000^(-i/(D/2 - 1)) (fairseq; M2M-100 and NLLB).
    An odd D leaves the last column zero.
    """
    half = d_model // 2
    i = torch.arange(half, dtype=torch.float64)
    step = 2 * i / d_model if layout != "fairseq" else i / max(half - 1, 1)
    angles = positions.double()[:, None] * torch.exp(-math.log(10000.0) * step)  # (P, D/2)
    pe = torch.zeros(len(positions), d_model, dtype=torch.float64)
    if layout == "paper":
        pe[:, 0 : 2 * half : 2], pe[:, 1 : 2 * half : 2] = angles.sin(), angles.cos()
    else:
        pe[:, :half], pe[:, half : 2 * half] = angles.sin(), angles.cos()
    return pe.float()


SINUSOIDS = ("paper", "halves", "fairseq")


class SinusoidalPositions(_Positions):
    """Fixed sinusoids added to the embeddings (`sinusoid_table`); the first token takes position `first` (NLLB's
    fairseq positions start after the padding index, at 2; batches are right-padded, so the padding-aware positions
    of fairseq and these agree on every real token)."""

    def __init__(self, d_model: int, max_len: int, layout: str = "paper", first: int = 0) -> None:
        super().__init__()
        self.max_len = max_len
        pe = sinusoid_table(d_model, torch.arange(first, first + max_len), layout)  # (max_len, D)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x (B, L, D) -> x + PE[offset : offset + L]."""
        self.check(x.shape[1], offset)
        return x + self.pe[offset : offset + x.shape[1]].to(x.dtype)

class LearnedPositions(_Positions):
    """A trained (max_len, D) table of position vectors, added to the embeddings."""

    def __init__(self, d_model: int, max_len: int, layout: str = "paper", first: int = 0) -> None:
        super().__init__()
        self.max_len = max_len
        self.table = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.table.weight, std=d_model**-0.5)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        self.check(x.shape[1], offset)
        return x + self.table.weight[offset : offset + x.shape[1]]


class AttentionPositions(_Positions):
    """Nothing added: the attention layers place tokens themselves (rotary positions, ALiBi); only the length
    limit is kept."""

    def __init__(self, d_model: int, max_len: int, layout: str = "paper", first: int = 0) -> None:
        super().__init__()
        self.max_len = max_len

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        self.check(x.shape[1], offset)
        return x


POSITIONS = {"sinusoidal": SinusoidalPositions, "learned": LearnedPositions, "rope": AttentionPositions,
             "alibi": AttentionPositions}
IN_ATTENTION = ("rope", "alibi")  # the kinds self-attention applies
