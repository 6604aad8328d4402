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


class Rotary(nn.Module):
    """Rotary positions (RoPE, Su et al. 2021): each pair of dimensions (2i, 2i + 1) of a query or key at position
    p, read as the complex number x_2i + j·x_2i+1, is multiplied by exp(j·p·θ_i), θ_i = 10000^(-2i / Dh); the
    product of a query and a key then depends on their positions' difference only."""

    def __init__(self, d_head: int, max_len: int) -> None:
        super().__init__()
        if d_head % 2:
            raise ConfigError(f"rotary positions rotate pairs of dimensions: the head width d_model / n_heads "
                              f"({d_head}) must be even")
        theta = 10000.0 ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)  # (Dh / 2,)
        angles = torch.arange(max_len, dtype=torch.float32)[:, None] * theta  # (max_len, Dh / 2)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        """x (B, H, L, Dh) at positions offset .. offset + L - 1 -> rotated, same shape."""
        cos = self.cos[offset : offset + x.shape[2]].to(x.dtype)  # (L, Dh / 2)
        sin = self.sin[offset : offset + x.shape[2]].to(x.dtype)
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


class ALiBi(nn.Module):
    """Attention with linear biases (Press et al. 2022): head h adds -m_h · |i - j| to the score of query position
    i on key position j, with the paper's geometric slopes m_h (for H a power of two, 2^(-8h / H), h = 1..H)."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.register_buffer("slopes", self.slopes_for(n_heads), persistent=False)

    @staticmethod
    def slopes_for(n: int) -> Tensor:
        def geometric(k: int) -> list[float]:
            return [2.0 ** (-8.0 * h / k) for h in range(1, k + 1)]

        if n & (n - 1) == 0:
            return torch.tensor(geometric(n))
        closest = 1 << (n.bit_length() - 1)  # the paper's rule otherwise: the closest power of two, then every
        return torch.tensor(geometric(closest) + geometric(2 * closest)[0::2][: n - closest])  # other one of 2x

    def forward(self, n_queries: int, n_keys: int, offset: int = 0) -> Tensor:
        """The bias (H, n_queries, n_keys) for queries at offset.., keys at 0.."""
        i = torch.arange(n_queries, device=self.slopes.device) + offset
        j = torch.arange(n_keys, device=self.slopes.device)
        return -self.slopes[:, None, None] * (i[:, None] - j[None]).abs()


class MultiHeadAttention(nn.Module):
    """Multi-head attention; `in_proj` stacks the q, k, v projections like ``nn.MultiheadAttention``.

    With `n_kv_heads` < `n_heads` (grouped-query attention, Ainslie et al. 2023), keys and values have fewer
    heads, each shared by n_heads / n_kv_heads query heads: the cache shrinks by that factor. `positions`
    ("rope" or "alibi") makes it position-aware itself (self-attention; the embeddings then add none)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, n_kv_heads: int | None = None,
                 positions: str | None = None, max_len: int = 1024) -> None:
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if d_model % n_heads:
            raise ConfigError(f"`model.d_model` ({d_model}) must be divisible by `model.n_heads` ({n_heads})")
        if n_heads % n_kv_heads:
            raise ConfigError(f"`model.n_heads` ({n_heads}) must be a multiple of `model.n_kv_heads` ({n_kv_heads})")
        self.d_model, self.n_heads, self.n_kv_heads, self.dropout = d_model, n_heads, n_kv_heads, dropout
        self.d_kv = n_kv_heads * (d_model // n_heads)
        self.in_proj = Linear(d_model, d_model + 2 * self.d_kv)
        self.out_proj = Linear(d_model, d_model)
        self.rotary = Rotary(d_model // n_heads, max_len) if positions == "rope" else None
        self.alibi = ALiBi(n_heads) if positions == "alibi" else None

    def _q(self, x: Tensor) -> Tensor:
        D = self.d_model
        return split_heads(linear(x, self.in_proj.weight[:D], self.in_proj.bias[:D]), self.n_heads)

    def _kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        D = self.d_model
        k, v = linear(x, self.in_proj.weight[D:], self.in_proj.bias[D:]).split(self.d_kv, dim=-1)  # (B, L, Dkv)
        return split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)  # (B, Hkv, L, Dh) each

    def _qkv(self, x: Tensor, offset: int) -> tuple[Tensor, Tensor, Tensor]:
        """Self-attention's queries (B, H, T, Dh), keys and values (B, Hkv, T, Dh) from x (B, T, D) at positions
        offset.., rotated where positions are rotary."""
        q, k, v = self.in_proj(x).split([self.d_model, self.d_kv, self.d_kv], dim=-1)
        q, k, v = split_heads(q, self.n_heads), split_heads(k, self.n_kv_heads), split_heads(v, self.n_kv_heads)
        if self.rotary is not None:
            q, k = self.rotary(q, offset), self.rotary(k, offset)
        return q, k, v

    def _mask(self, keep: Tensor | None, n_queries: int, n_keys: int, offset: int) -> Tensor | None:
        """The keep mask, or with ALiBi the float bias (.., H, T, L) with -inf where keep is False."""
        if self.alibi is None:
            return keep
        bias = self.alibi(n_queries, n_keys, offset)
        return bias if keep is None else bias.masked_fill(~keep, float("-inf"))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, offset: int = 0) -> Tensor:
        p = self.dropout if self.training else 0.0
        mask = self._mask(keep, q.shape[2], k.shape[2], offset)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                             enable_gqa=self.n_kv_heads != self.n_heads)  # (B, H, T, Dh)
        return self.out_proj(merge_heads(out))  # (B, T, D)

    def forward(self, x: Tensor, memory: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """x (B, T, D) attends to memory (B, L, D), or to itself when memory is None; keep -> (B, H, T, L)."""
        if memory is None:
            q, k, v = self._qkv(x, 0)
        else:
            q, (k, v) = self._q(x), self._kv(memory)
        return self._attend(q, k, v, keep)

    @torch.no_grad()
    def weights(self, x: Tensor, memory: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
        """Attention probabilities (B, H, T, L) of `forward(x, memory, keep)`, for inspection and plots."""
        q, k = self._qkv(x, 0)[:2] if memory is None else (self._q(x), self._kv(memory)[0])
        k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)  # (B, H, L, Dh)
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # (B, H, T, L)
        mask = self._mask(keep, q.shape[2], k.shape[2], 0)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        return scores.softmax(-1)

    def empty_cache(self, batch: int, capacity: int, like: Tensor) -> KVCache:
        shape = (capacity, batch, self.n_kv_heads, self.d_model // self.n_heads)  # (capacity, B, Hkv, Dh)
        return KVCache(like.new_empty(shape), like.new_empty(shape))

    def step(self, x: Tensor, cache: KVCache) -> Tensor:
        """Self-attention from one new position x (B, 1, D): its key and value join the cache, then it attends."""
        at = cache.length  # this position
        q, k, v = self._qkv(x, at)  # (B, H, 1, Dh), (B, Hkv, 1, Dh) x 2
        cache.append(k, v)
        return self._attend(q, *cache.keys_values(), None, at)

    def memory_keys_values(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Cross-attention keys and values (B, Hkv, S, Dh), computed once per source from memory (B, S, D)."""
        return self._kv(memory)

    def step_memory(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], keep: Tensor) -> Tensor:
        """Cross-attention from one new position x (B, 1, D) over `memory_keys_values` with keep (B_src, 1, 1, S).

        x may hold G = B / B_src consecutive rows per source (the beams of beam search): they attend as G queries
        of that source, so its keys and values are neither copied per beam nor reordered.
        """
        k, v = memory_kv  # (B_src, Hkv, S, Dh)
        B, G = x.shape[0], x.shape[0] // k.shape[0]
        q = self._q(x.view(k.shape[0], G, self.d_model))  # (B_src, H, G, Dh)
        return self._attend(q, k, v, keep).view(B, 1, self.d_model)
