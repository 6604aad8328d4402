import pytest
import torch

from seq2seq.decoding import beam_search, greedy, max_length, strip
from seq2seq.testing import BOS, EOS, random_batch
from seq2seq.testing import VOCAB as V
from seq2seq.testing import tiny_model as make_model


def test_cached_greedy_emits_exactly_the_tokens_of_uncached_greedy():
    model = make_model(seed=3)
    src, src_keep, _, _ = random_batch()
    no_eos = torch.ones(V, dtype=torch.bool)
    no_eos[EOS] = False  # force full-length decoding so every step is compared
    for allowed in (None, no_eos):
        cached = greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, allowed=allowed)
        uncached = greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, allowed=allowed, use_cache=False)
        assert torch.equal(cached, uncached)
    assert cached.shape == (src.shape[0], 12)


def test_greedy_never_emits_a_token_outside_the_allowed_set():
    model = make_model(seed=4)
    src, src_keep, _, _ = random_batch()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[EOS, 5, 6]] = True
    out = greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=10, allowed=allowed)
    assert set(out.unique().tolist()) <= {EOS, 5, 6}


def test_greedy_pads_finished_rows_with_eos_and_strip_cuts_there():
    tokens = torch.tensor([[5, 6, EOS, EOS], [7, 8, 9, 10]])
    assert strip(tokens, EOS) == [[5, 6], [7, 8, 9, 10]]


def test_max_length_is_a_times_longest_source_plus_b():
    keep = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    assert max_length(keep, 1.5, 3) == 9
    assert max_length(keep, 0.0, 0) == 1


def _sequence_logprob(model, src, src_keep, tokens) -> torch.Tensor:
    """Teacher-forced log-probability of each row of `tokens` (B, L), up to and including its first EOS."""
    B = tokens.shape[0]
    tgt_in = torch.cat([torch.full((B, 1), BOS), tokens[:, :-1]], dim=1)
    logp = model(src, src_keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool)).log_softmax(-1)
    token_logp = logp.gather(-1, tokens[..., None])[..., 0]  # (B, L)
    upto_eos = torch.cat([torch.ones(B, 1, dtype=torch.bool), (tokens != EOS).cumprod(-1)[:, :-1].bool()], dim=1)
    return (token_logp * upto_eos).sum(-1)


def test_beam_of_one_equals_greedy():
    model = make_model(seed=5)
    src, src_keep, _, _ = random_batch()
    g = greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=10)
    b = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=10, beam=1)
    assert torch.equal(b.tokens[:, 0, : g.shape[1]], g)


@pytest.mark.parametrize("seed", range(5))
def test_a_wider_beam_never_scores_below_greedy_on_the_models_objective(seed):
    model = make_model(seed=seed)
    src, src_keep, _, _ = random_batch(seed=seed)
    g = greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=8)
    b = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=8, beam=4)
    greedy_score = _sequence_logprob(model, src, src_keep, g)
    assert (b.scores[:, 0] >= greedy_score - 1e-4).all()
    torch.testing.assert_close(b.scores[:, 0], _sequence_logprob(model, src, src_keep, b.tokens[:, 0]),
                               atol=1e-4, rtol=1e-4)


def test_n_best_lists_are_sorted_by_score_and_cached_equals_uncached():
    model = make_model(seed=6)
    src, src_keep, _, _ = random_batch()
    kwargs = {"bos": BOS, "eos": EOS, "max_len": 9, "beam": 5, "n_best": 3, "length_penalty": 0.6}
    cached = beam_search(model, src, src_keep, **kwargs)
    uncached = beam_search(model, src, src_keep, use_cache=False, **kwargs)
    assert cached.tokens.shape[:2] == (4, 3)
    assert (cached.scores[:, :-1] >= cached.scores[:, 1:]).all()
    assert torch.equal(cached.tokens, uncached.tokens)
    torch.testing.assert_close(cached.scores, uncached.scores)


def test_beam_search_respects_the_allowed_set():
    model = make_model(seed=7)
    src, src_keep, _, _ = random_batch()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[5, 6]] = True  # labels only, no EOS: decodes exactly max_len steps
    out = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=7, beam=3, allowed=allowed)
    assert out.tokens.shape[-1] == 7 and set(out.tokens.unique().tolist()) <= {5, 6}
