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
from seq2seq.linear import Linear, linear


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
    """Self-attention keys and values of one attention module during incremental decoding.

    Stored time-major, (capacity, B, H, Dh), of which the first `length` positions are filled: the filled part is
    one contiguous block, so appending writes one slab and beam search reorders only what is filled.
    """

    k: Tensor
    v: Tensor
    length: int = 0
    spare: tuple[Tensor, Tensor] | None = None  # a buffer of the cache's shape for reorders that move many rows

    def append(self, k: Tensor, v: Tensor) -> None:
        """k, v (B, H, 1, Dh): one new position."""
        if self.length == self.k.shape[0]:
            raise RuntimeError(f"KV cache is full ({self.k.shape[0]} positions); decode with a larger max length")
        self.k[self.length], self.v[self.length] = k[:, :, 0], v[:, :, 0]
        self.length += 1

    def keys_values(self) -> tuple[Tensor, Tensor]:
        """The filled positions as (B, H, length, Dh) views."""
        n = self.length
        return self.k[:n].permute(1, 2, 0, 3), self.v[:n].permute(1, 2, 0, 3)

    def reorder(self, index: Tensor, moved: Tensor | None = None) -> None:
        """Row i continues row index[i] (beam search): index (B,) into B; moved (M,) the rows i != index[i], when
        known.

        A beam step usually moves few rows, which are copied in place. When it moves a third of them or more (or
        which rows move is not known), every row is copied into the spare buffer, which then changes places with the
        cache.
        """
        n = self.length
        if moved is not None and 3 * len(moved) < len(index):
            parents = index[moved]
            for cache in (self.k[:n], self.v[:n]):
                cache.index_copy_(1, moved, cache.index_select(1, parents))
            return
        k, v = self.spare or (torch.empty_like(self.k), torch.empty_like(self.v))
        torch.index_select(self.k[:n], 1, index, out=k[:n])
        torch.index_select(self.v[:n], 1, index, out=v[:n])
        self.k, self.v, self.spare = k, v, (self.k, self.v)


class MultiHeadAttention(nn.Module):
    """Multi-head attention; `in_proj` stacks the q, k, v projections like ``nn.MultiheadAttention``."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"`model.d_model` ({d_model}) must be divisible by `model.n_heads` ({n_heads})")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.in_proj = Linear(d_model, 3 * d_model)
        self.out_proj = Linear(d_model, d_model)

    def _q(self, x: Tensor) -> Tensor:
        D = self.d_model
        return split_heads(linear(x, self.in_proj.weight[:D], self.in_proj.bias[:D]), self.n_heads)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        D = self.d_model
        k, v = linear(x, self.in_proj.weight[D:], self.in_proj.bias[D:]).chunk(2, dim=-1)  # (B, L, D) each
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
        shape = (capacity, batch, self.n_heads, self.d_model // self.n_heads)  # (capacity, B, H, Dh)
        return KVCache(like.new_empty(shape), like.new_empty(shape))

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """Self-attention from one new position x (B, 1, D): its key and value join the cache, then it attends."""
        q, k, v = (split_heads(t, self.n_heads) for t in self.in_proj(x).chunk(3, dim=-1))  # (B, H, 1, Dh)
        cache.append(k, v)
        return self._attend(q, *cache.keys_values(), None)

    def memory_keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, H, S, Dh), computed once per source from memory (B, S, D)."""
        return self._kv(memory)

    def step_memory(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], keep: Tensor) -> Tensor:
        """Cross-attention from one new position x (B, 1, D) over `memory_keys_values` with keep (B_src, 1, 1, S).

        x may hold G = B / B_src consecutive rows per source (the beams of beam search): they attend as G queries
        of that source, so its keys and values are neither copied per beam nor reordered.
        """
        k, v = memory_kv  # (B_src, H, S, Dh)
        B, G = x.shape[0], x.shape[0] // k.shape[0]
        q = self._q(x.view(k.shape[0], G, self.d_model))  # (B_src, H, G, Dh)
        return self._attend(q, k, v, keep).view(B, 1, self.d_model)
