import torch

from seq2seq.decoding import greedy, max_length, strip
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
