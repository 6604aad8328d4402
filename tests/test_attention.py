import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.attention import KVCache, MultiHeadAttention, causal_keep, merge_heads, padding_keep, split_heads

B, T, S, D, H = 3, 5, 7, 16, 4


def _attention(seed: int = 0) -> MultiHeadAttention:
    torch.manual_seed(seed)
    return MultiHeadAttention(D, H).eval()


def _keep(B: int, L: int, lengths: list[int]) -> torch.Tensor:
    return torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # (B, L)


@pytest.mark.parametrize("masked", [False, True])
def test_attention_equals_scaled_dot_product_attention_on_the_same_projections(masked):
    attn = _attention()
    x, mem = torch.randn(B, T, D), torch.randn(B, S, D)
    keep = padding_keep(_keep(B, S, [7, 4, 1])) if masked else None
    W, b = attn.in_proj.weight, attn.in_proj.bias
    q = split_heads(F.linear(x, W[:D], b[:D]), H)
    k = split_heads(F.linear(mem, W[D : 2 * D], b[D : 2 * D]), H)
    v = split_heads(F.linear(mem, W[2 * D :], b[2 * D :]), H)
    expected = attn.out_proj(merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=keep)))
    torch.testing.assert_close(attn(x, mem, keep=keep), expected)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_equals_torch_multihead_attention_with_copied_weights(masked, cross):
    attn = _attention()
    ref = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.in_proj.weight)
        ref.in_proj_bias.copy_(attn.in_proj.bias)
        ref.out_proj.weight.copy_(attn.out_proj.weight)
        ref.out_proj.bias.copy_(attn.out_proj.bias)
    x = torch.randn(B, T, D)
    kv = torch.randn(B, S, D) if cross else x
    keep = _keep(B, kv.shape[1], [kv.shape[1], 3, 1]) if masked else None
    # nn.MultiheadAttention takes the opposite convention: True = ignore this key.
    expected, _ = ref(x, kv, kv, key_padding_mask=None if keep is None else ~keep, need_weights=False)
    got = attn(x, kv if cross else None, keep=None if keep is None else padding_keep(keep))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_causal_keep_combines_look_ahead_and_padding():
    keep = causal_keep(_keep(2, 4, [4, 2]))  # (B, 1, T, T)
    assert keep.shape == (2, 1, 4, 4)
    assert torch.equal(keep[0, 0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert not keep[1, 0, :, 2:].any(), "padded keys must never be attended"
    assert keep[1, 0, 3, :2].all()


def test_cached_self_attention_steps_equal_full_causal_attention():
    attn = _attention()
    x = torch.randn(B, T, D)
    full = attn(x, keep=causal_keep(torch.ones(B, T, dtype=torch.bool)))
    cache = attn.empty_cache(B, T, x)
    steps = torch.cat([attn.step(x[:, t : t + 1], cache) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-6, rtol=1e-5)


def test_cross_attention_steps_over_memory_keys_values_match_full_attention():
    attn = _attention()
    x, mem = torch.randn(B, T, D), torch.randn(B, S, D)
    keep = padding_keep(_keep(B, S, [7, 4, 1]))
    memory_kv = attn.memory_keys_values(mem)
    steps = torch.cat([attn.step_memory(x[:, t : t + 1], memory_kv, keep) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, attn(x, mem, keep=keep), atol=1e-6, rtol=1e-5)


def test_a_full_cache_raises_instead_of_overwriting():
    attn = _attention()
    cache = attn.empty_cache(1, 1, torch.zeros(1))
    attn.step(torch.randn(1, 1, D), cache)
    with pytest.raises(RuntimeError, match="cache is full"):
        attn.step(torch.randn(1, 1, D), cache)


@pytest.mark.parametrize("known", [True, False])  # rows that move given (CPU), or not (every row is copied)
def test_kv_cache_reorders_move_whole_rows_whether_few_or_many_rows_move(known):
    rows = 6
    cache = KVCache(torch.empty(4, rows, H, 2), torch.empty(4, rows, H, 2))
    for _ in range(3):
        cache.append(torch.randn(rows, H, 1, 2), torch.randn(rows, H, 1, 2))
    # One row moves (copied in place), then five (through the spare buffer), then five again (buffers swap back).
    for index in ([0, 0, 2, 3, 4, 5], [5, 0, 1, 2, 3, 5], [1, 2, 3, 4, 5, 0]):
        index = torch.tensor(index)
        expected = [t[index].clone() for t in cache.keys_values()]  # (B, H, length, Dh) each
        cache.reorder(index, (index != torch.arange(rows)).nonzero()[:, 0] if known else None)
        for got, want in zip(cache.keys_values(), expected, strict=True):
            assert torch.equal(got, want)
    cache.append(torch.ones(rows, H, 1, 2), torch.ones(rows, H, 1, 2))
    assert cache.keys_values()[0].shape == (rows, H, 4, 2) and cache.keys_values()[0][:, :, 3].eq(1).all()


def test_attention_weights_reproduce_the_output_and_respect_the_mask():
    attn = _attention()
    x, mem = torch.randn(B, T, D), torch.randn(B, S, D)
    keep = padding_keep(_keep(B, S, [7, 4, 1]))
    w = attn.weights(x, mem, keep)  # (B, H, T, S)
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, T))
    assert (w[1, ..., 4:] == 0).all() and (w[2, ..., 1:] == 0).all()
    D_ = attn.d_model
    v = split_heads(F.linear(mem, attn.in_proj.weight[2 * D_ :], attn.in_proj.bias[2 * D_ :]), H)
    torch.testing.assert_close(attn.out_proj(merge_heads(w @ v)), attn(x, mem, keep=keep), atol=1e-6, rtol=1e-5)
