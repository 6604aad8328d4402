import itertools
from functools import partial

import pytest
import torch

from seq2seq.beam import beam_search
from seq2seq.decoding import Decoder, DecodeSpec, greedy, sample_from
from seq2seq.search import max_length, repeated_ngram_mask, strip
from seq2seq.testing import BOS, EOS, Favour, random_batch
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
    model = make_model(seed=0)
    model.head = Favour(model.head, [EOS], 3.0)  # two rows finish near step 18, two run to max_len
    src, src_keep, _, _ = random_batch()
    out = greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=40)
    ends = [row.index(EOS) for row in out.tolist() if EOS in row]
    assert out.shape[1] == 40 and len(ends) == 2 and max(ends) < 30
    for row in out.tolist():
        if EOS in row:
            assert set(row[row.index(EOS):]) == {EOS}  # every position after a row's EOS holds EOS
    assert strip(out, EOS) == [row[: row.index(EOS)] if EOS in row else row for row in out.tolist()]


@pytest.mark.parametrize("decode", [{}, {"beam": 3}, {"sampling": True}, {"one_shot": True}])
def test_the_decoder_never_emits_pad_or_bos_and_over_a_label_set_only_labels(decode):
    model = make_model(seed=5)
    src, src_keep, _, _ = random_batch()
    model.head = Favour(model.head, [0, BOS])  # PAD and BOS are the model's favourites
    plain = Decoder(DecodeSpec(**decode), bos=BOS, eos=EOS, pad=0, vocab_size=V)
    out = plain(model, src, src_keep)
    assert not {0, BOS} & set(out.unique().tolist())
    labels = Decoder(DecodeSpec(**decode, max_len_a=0, max_len_b=4), bos=BOS, eos=EOS, pad=0, vocab_size=V,
                     label_ids=(7, 8))
    assert set(labels(model, src, src_keep).unique().tolist()) <= {7, 8}


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


def test_a_beam_wider_than_the_vocabulary_finds_every_sequence_in_score_order():
    model = make_model(seed=8)
    src, src_keep, _, _ = random_batch()
    allowed = torch.zeros(V, dtype=torch.bool)
    allowed[[5, 6]] = True  # 2 ** 3 sequences of length 3; the beam (30) is wider than the vocabulary (23)
    out = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=3, beam=30, n_best=8, allowed=allowed)
    every = torch.tensor(list(itertools.product([5, 6], repeat=3)))  # (8, 3)
    for row in range(src.shape[0]):
        tgt_in = torch.cat([torch.full((8, 1), BOS), every[:, :-1]], dim=1)
        logits = model(src[row].expand(8, -1), src_keep[row].expand(8, -1), tgt_in, torch.ones_like(tgt_in).bool())
        logp = logits.masked_fill(~allowed, float("-inf")).log_softmax(-1).gather(-1, every[..., None])[..., 0]
        best = logp.sum(-1).sort(descending=True)
        assert torch.equal(out.tokens[row], every[best.indices])
        torch.testing.assert_close(out.scores[row], best.values, atol=1e-5, rtol=1e-5)


def test_repeated_ngram_mask_bans_exactly_the_completing_tokens():
    tokens = torch.tensor([[5, 6, 5], [7, 8, 9]])
    banned = repeated_ngram_mask(tokens, 2, V)  # row 0 ends with 5 and "5 6" occurred: 6 is banned
    assert banned[0].nonzero().flatten().tolist() == [6]
    assert not banned[1].any()
    assert repeated_ngram_mask(tokens, 1, V)[1].nonzero().flatten().tolist() == [7, 8, 9]


def test_no_repeat_ngram_decoding_never_repeats_a_bigram():
    model = make_model(seed=8)
    src, src_keep, _, _ = random_batch()
    no_eos = torch.ones(V, dtype=torch.bool)
    no_eos[EOS] = False
    for search in (greedy, lambda *a, **k: beam_search(*a, beam=3, **k).tokens[:, 0]):
        out = search(model, src, src_keep, bos=BOS, eos=EOS, max_len=15, allowed=no_eos, no_repeat_ngram=2)
        for row in out.tolist():
            bigrams = list(itertools.pairwise(row))
            assert len(bigrams) == len(set(bigrams))


def test_sampling_respects_top_k_and_top_p_and_is_reproducible_with_a_generator():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    top2 = sample_from(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(top2.tolist()) == {0, 1}
    nucleus = sample_from(logits, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(nucleus.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 2 and 3 are outside
    cold = sample_from(logits, temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert (cold == 0).float().mean() > 0.99
    again = sample_from(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(top2, again)
    assert 0.55 < (top2 == 0).float().mean() < 0.70  # 0.5 / 0.8 = 0.625


def test_sampled_decoding_uses_the_cache_exactly():
    model = make_model(seed=9)
    src, src_keep, _, _ = random_batch()
    runs = [greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=10, use_cache=cache,
                   sampler=partial(sample_from, generator=torch.Generator().manual_seed(3)))
            for cache in (True, False)]
    assert torch.equal(runs[0], runs[1])


def test_average_length_normalization_ranks_by_score_per_token():
    model = make_model(seed=10)
    src, src_keep, _, _ = random_batch()
    out = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=9, beam=4, n_best=4,
                      length_normalization="average")
    raw = torch.stack([_sequence_logprob(model, src, src_keep, out.tokens[:, k]) for k in range(4)], dim=1)
    length = ((out.tokens != EOS).cumprod(-1).sum(-1) + (out.tokens == EOS).any(-1).long()).clamp(min=1)
    torch.testing.assert_close(out.scores, raw / length, atol=1e-4, rtol=1e-4)
