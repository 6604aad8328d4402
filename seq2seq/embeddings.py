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


class SinusoidalPositions(_Positions):
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...), added to the embeddings."""

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]  # (max_len, 1)
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        pe = torch.zeros(max_len, d_model)  # (max_len, D)
        pe[:, 0::2] = torch.sin(pos * inv_freq)
        pe[:, 1::2] = torch.cos(pos * inv_freq)
        self.register_buffer("pe", pe, persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x (B, L, D) -> x + PE[offset : offset + L]."""
        self.check(x.shape[1], offset)
        return x + self.pe[offset : offset + x.shape[1]].to(x.dtype)


class LearnedPositions(_Positions):
    """A trained (max_len, D) table of position vectors, added to the embeddings."""

    def __init__(self, d_model: int, max_len: int) -> None:
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

    def __init__(self, d_model: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        self.check(x.shape[1], offset)
        return x


POSITIONS = {"sinusoidal": SinusoidalPositions, "learned": LearnedPositions, "rope": AttentionPositions,
             "alibi": AttentionPositions}
IN_ATTENTION = ("rope", "alibi")  # the kinds self-attention applies
