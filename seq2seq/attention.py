"""Multi-head scaled dot-product attention with a key/value cache for incremental decoding.

Shape legend (used in every file): B batch, S source length, T target length, L key length (S or T),
D model width, H heads, Dh = D // H, V output vocabulary, F numeric features.

Masks are boolean *keep* masks: True means "this query may attend to this key", the convention of
``F.scaled_dot_product_attention``. A keep mask broadcasts to (B, H, T, L); padding masks are (B, 1, 1, L).
Convert only at the boundary with APIs of the opposite meaning (``nn.MultiheadAttention``'s key_padding_mask).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seq2seq.errors import ConfigError


def padding_keep(keep: Tensor) -> Tensor:
    """(B, L) keep -> (B, 1, 1, L), broadcasting over heads and queries."""
    return keep[:, None, None, :]


def causal_keep(keep: Tensor) -> Tensor:
    """(B, T) target keep -> (B, 1, T, T): look-ahead mask combined with padding."""
    T = keep.shape[1]
    ahead = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril()  # (T, T)
    return ahead & padding_keep(keep)


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    B, L, D = x.shape
    return x.view(B, L, n_heads, D // n_heads).transpose(1, 2)  # (B, H, L, Dh)


def merge_heads(x: Tensor) -> Tensor:
    B, H, L, Dh = x.shape
    return x.transpose(1, 2).reshape(B, L, H * Dh)  # (B, L, D)


@dataclass
class KVCache:
    """Keys and values of one attention module, (B, H, capacity, Dh); the first `length` positions are filled.

    Self-attention caches start empty and grow by one position per decoding step; cross-attention caches are
    filled once from the encoder output.
    """

    k: Tensor
    v: Tensor
    length: int

    def append(self, k: Tensor, v: Tensor) -> None:
        n = k.shape[2]
        if self.length + n > self.k.shape[2]:
            raise RuntimeError(f"KV cache is full ({self.k.shape[2]} positions); decode with a larger max length")
        self.k[:, :, self.length : self.length + n] = k
        self.v[:, :, self.length : self.length + n] = v
        self.length += n

    def keys_values(self) -> tuple[Tensor, Tensor]:
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def reorder(self, index: Tensor) -> None:
        """Select batch rows (beam search reorders hypotheses): index (B',) into B."""
        self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)


class MultiHeadAttention(nn.Module):
    """Multi-head attention; `in_proj` stacks the q, k, v projections like ``nn.MultiheadAttention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"`model.d_model` ({d_model}) must be divisible by `model.n_heads` ({n_heads})")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _q(self, x: Tensor) -> Tensor:
        D = self.d_model
        return split_heads(F.linear(x, self.in_proj.weight[:D], self.in_proj.bias[:D]), self.n_heads)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        D = self.d_model
        k, v = F.linear(x, self.in_proj.weight[D:], self.in_proj.bias[D:]).chunk(2, dim=-1)  # (B, L, D) each
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)  # (B, H, L, Dh) each

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None) -> Tensor:
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # (B, H, T, Dh)
        return self.out_proj(merge_heads(out))  # (B, T, D)

    def forward(self, x: Tensor, memory: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """x (B, T, D) attends to memory (B, L, D), or to itself when memory is None; keep -> (B, H, T, L)."""
        if memory is None:
            q, k, v = (split_heads(t, self.n_heads) for t in self.in_proj(x).chunk(3, dim=-1))  # (B, H, T, Dh)
        else:
            q, (k, v) = self._q(x), self._kv(memory)
        return self._attend(q, k, v, keep)

    @torch.no_grad()
    def weights(self, x: Tensor, memory: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Attention probabilities (B, H, T, L) of `forward(x, memory, keep)`, for inspection and plots."""
        q, k = self._q(x), self._kv(x if memory is None else memory)[0]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, L)
        if keep is not None:
            scores = scores.masked_fill(~keep, float("-inf"))
        return scores.softmax(-1)

    def empty_cache(self, batch: int, capacity: int, like: Tensor) -> KVCache:
        shape = (batch, self.n_heads, capacity, self.d_model // self.n_heads)  # (B, H, capacity, Dh)
        return KVCache(like.new_empty(shape), like.new_empty(shape), 0)

    def memory_cache(self, memory: Tensor) -> KVCache:
        """Cross-attention keys and values, computed once per source: memory (B, S, D)."""
        k, v = self._kv(memory)
        return KVCache(k, v, k.shape[2])

    def step(self, x: Tensor, cache: KVCache, keep: Tensor | None = None, grow: bool = True) -> Tensor:
        """Attend from one new position x (B, 1, D) through a cache.

        `grow=True` is self-attention: x's own key/value are appended first. `grow=False` is cross-attention over
        a cache from `memory_cache` with the source keep mask (B_src, 1, 1, S). There x may hold G = B / B_src
        consecutive rows per source (the beams of beam search): they attend as G queries of that source, so its
        keys and values are neither copied per beam nor reordered.
        """
        if grow:
            q, k, v = (split_heads(t, self.n_heads) for t in self.in_proj(x).chunk(3, dim=-1))  # (B, H, 1, Dh)
            cache.append(k, v)
            return self._attend(q, *cache.keys_values(), keep)
        k, v = cache.keys_values()  # (B_src, H, S, Dh)
        B, G = x.shape[0], x.shape[0] // k.shape[0]
        q = self._q(x.view(k.shape[0], G, self.d_model))  # (B_src, H, G, Dh)
        return self._attend(q, k, v, keep).view(B, 1, self.d_model)
