"""Positions and attention beyond the paper: rotary positions, ALiBi, grouped-query attention.

Each against a direct reference, and each through the core's contracts: cached decoding equals uncached, padding
changes nothing, positions matter, and ONNX export decodes as the eager model.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from seq2seq.attention import ALiBi, MultiHeadAttention, Rotary, causal_keep, padding_keep
from seq2seq.beam import beam_search
from seq2seq.decoding import greedy
from seq2seq.errors import ConfigError
from seq2seq.model import ModelSpec
from seq2seq.testing import BOS, EOS, random_batch, tiny_model

B, T, D, H = 3, 6, 16, 4
VARIANTS = {"rope": {"positions": "rope"}, "alibi": {"positions": "alibi"}, "gqa": {"n_kv_heads": 2},
            "mqa-rope": {"n_kv_heads": 1, "positions": "rope"}}


def test_rotary_positions_equal_the_complex_rotation_formula():
    d, L = 8, 11
    x = torch.randn(2, 3, L, d, dtype=torch.float64)
    rotated = Rotary(d, 32).double()(x, offset=5)
    # Pairs (2i, 2i + 1) as complex numbers, times exp(j · p · θ_i), θ_i = 10000^(-2i/d), at positions 5..15.
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    theta = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    p = torch.arange(5, 5 + L, dtype=torch.float64)[:, None]
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(p * theta), p * theta)).flatten(-2)
    torch.testing.assert_close(rotated.float(), expected.float(), atol=1e-5, rtol=1e-5)
    # What makes it relative: a query-key product depends on the distance of their positions only.
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    rope = Rotary(d, 64).double()

    def at(v, pos):
        return rope(v.view(1, 1, 1, d).expand(1, 1, pos + 1, d).contiguous())[0, 0, pos]

    assert torch.isclose(at(q, 9) @ at(k, 4), at(q, 30) @ at(k, 25))


def test_alibi_adds_minus_slope_times_distance_with_the_papers_slopes():
    assert ALiBi.slopes_for(8).tolist() == [2.0**-i for i in range(1, 9)]
    assert ALiBi.slopes_for(6).tolist() == [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]  # 4, then odd ones of 8
    torch.manual_seed(0)
    attn = MultiHeadAttention(D, H, positions="alibi").eval()
    x = torch.randn(B, T, D)
    keep = causal_keep(torch.ones(B, T, dtype=torch.bool))
    q, k, v = (t.view(B, T, H, D // H).transpose(1, 2) for t in attn.in_proj(x).chunk(3, -1))
    slopes = ALiBi.slopes_for(H)
    dist = (torch.arange(T)[:, None] - torch.arange(T)[None]).abs()
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // H) - slopes[:, None, None] * dist
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    expected = attn.out_proj((probs @ v).transpose(1, 2).reshape(B, T, D))
    torch.testing.assert_close(attn(x, keep=keep), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.weights(x, keep=keep), probs, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cross", [False, True])
def test_gqa_with_as_many_kv_heads_as_heads_equals_torch_multihead_attention(cross):
    torch.manual_seed(1)
    ours = MultiHeadAttention(D, H, n_kv_heads=H).eval()
    ref = nn.MultiheadAttention(D, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.in_proj.weight)
        ref.in_proj_bias.copy_(ours.in_proj.bias)
        ref.out_proj.load_state_dict(ours.out_proj.state_dict())
    x, mem = torch.randn(B, T, D), torch.randn(B, T + 2, D)
    keys = mem if cross else x
    torch.testing.assert_close(ours(x, mem if cross else None), ref(x, keys, keys, need_weights=False)[0],
                               atol=1e-5, rtol=1e-5)


def test_gqa_equals_multihead_attention_whose_key_and_value_heads_are_copied_per_group():
    torch.manual_seed(2)
    kv = 2
    gqa = MultiHeadAttention(D, H, n_kv_heads=kv, positions="rope").eval()
    mha = MultiHeadAttention(D, H, positions="rope").eval()
    dh = D // H
    with torch.no_grad():
        w, b = gqa.in_proj.weight, gqa.in_proj.bias  # (D + 2 · kv · dh, D)

        def per_head(t):  # (kv · dh, ...) -> each kv head repeated for its H / kv query heads
            return t.view(kv, dh, *t.shape[1:]).repeat_interleave(H // kv, 0).reshape(H * dh, *t.shape[1:])

        mha.in_proj.weight.copy_(torch.cat([w[:D], per_head(w[D : D + kv * dh]), per_head(w[D + kv * dh :])]))
        mha.in_proj.bias.copy_(torch.cat([b[:D], per_head(b[D : D + kv * dh]), per_head(b[D + kv * dh :])]))
        mha.out_proj.load_state_dict(gqa.out_proj.state_dict())
    x = torch.randn(B, T, D)
    keep = causal_keep(torch.ones(B, T, dtype=torch.bool))
    torch.testing.assert_close(gqa(x, keep=keep), mha(x, keep=keep), atol=1e-5, rtol=1e-5)
    assert gqa.empty_cache(B, T, x).k.shape == (T, B, kv, dh)  # the cache holds the shared heads only


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_steps_equal_full_attention(variant):
    torch.manual_seed(3)
    spec = VARIANTS[variant]
    attn = MultiHeadAttention(D, H, n_kv_heads=spec.get("n_kv_heads"), positions=spec.get("positions")).eval()
    x = torch.randn(B, T, D)
    full = attn(x, keep=causal_keep(torch.ones(B, T, dtype=torch.bool)))
    cache = attn.empty_cache(B, T, x)
    steps = torch.cat([attn.step(x[:, t : t + 1], cache) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)
    # Cross-attention (which the models give no positions) over the memory's shared keys and values.
    torch.manual_seed(3)
    cross = MultiHeadAttention(D, H, n_kv_heads=spec.get("n_kv_heads")).eval()
    mem = torch.randn(B, T + 1, D)
    keep = padding_keep(torch.arange(T + 1)[None] < torch.tensor([[7], [3], [1]]))
    kv = cross.memory_keys_values(mem)
    steps = torch.cat([cross.step_memory(x[:, t : t + 1], kv, keep) for t in range(T)], dim=1)
    torch.testing.assert_close(steps, cross(x, mem, keep=keep), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_models_keep_the_core_contracts(variant):
    model = tiny_model(seed=4, **VARIANTS[variant])
    src, src_keep, tgt, tgt_keep = random_batch()
    out = model(src, src_keep, tgt, tgt_keep)
    # Padding changes nothing.
    extra = 4
    padded = torch.cat([src, torch.randint(3, 20, (src.shape[0], extra))], dim=1)
    padded_keep = torch.cat([src_keep, torch.zeros(src.shape[0], extra, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(model(padded, padded_keep, tgt, tgt_keep)[tgt_keep], out[tgt_keep],
                               atol=1e-5, rtol=1e-5)
    # Positions matter: without them self-attention is permutation-equivariant and the outputs would agree to
    # float noise (1e-6). (Not a reversal: symmetric ALiBi distances would not see it.)
    keep_s, keep_t = torch.ones_like(src, dtype=torch.bool), torch.ones_like(tgt, dtype=torch.bool)
    shuffled = src[:, torch.randperm(src.shape[1], generator=torch.Generator().manual_seed(0))]
    if "positions" in VARIANTS[variant]:
        assert (model(shuffled, keep_s, tgt, keep_t) - model(src, keep_s, tgt, keep_t)).abs().max() > 1e-2
    # Cached decoding equals uncached, greedy and beam.
    no_eos = torch.ones(model.head.proj.out_features, dtype=torch.bool)
    no_eos[EOS] = False
    for search in (greedy, lambda *a, **k: beam_search(*a, beam=3, n_best=3, **k).tokens):
        cached = search(model, src, src_keep, bos=BOS, eos=EOS, max_len=10, allowed=no_eos)
        assert torch.equal(cached, search(model, src, src_keep, bos=BOS, eos=EOS, max_len=10, allowed=no_eos,
                                          use_cache=False))


def test_bad_head_settings_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"`model.n_heads` \(8\) must be a multiple of `model.n_kv_heads` \(3\)"):
        ModelSpec(n_kv_heads=3)
    with pytest.raises(ConfigError, match="head width d_model / n_heads \\(3\\) must be even"):
        ModelSpec(d_model=24, n_heads=8, positions="rope")


def test_alibi_sdpa_mask_broadcasts_over_padding():
    attn = MultiHeadAttention(D, H, positions="alibi").eval()
    x = torch.randn(B, T, D)
    keep = padding_keep(torch.arange(T)[None] < torch.tensor([[6], [4], [2]]))
    out = attn(x, keep=keep)
    shorter = attn(x[:, :2], keep=keep[..., :2])
    torch.testing.assert_close(out[2, :2], shorter[2], atol=1e-5, rtol=1e-5)  # keys past a row's length: no effect
    assert not F.pad(out, (0, 0)).isnan().any()


@pytest.mark.parametrize("options", [["model.positions=rope", "model.n_kv_heads=2"], ["model.positions=alibi"]])
def test_the_conformance_kit_passes_on_a_domain_with_them(options):
    from seq2seq import testing

    testing.check_contracts(["experiment=reverse", "model.d_model=32", "model.d_ff=64", *options])
