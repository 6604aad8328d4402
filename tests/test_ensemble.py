"""Ensembles decode as one model: the mean of the members' log-probabilities (seq2seq.ensemble)."""

import torch

from seq2seq.beam import beam_search
from seq2seq.decoding import Decoder, DecodeSpec, greedy
from seq2seq.ensemble import Ensemble
from seq2seq.guides import Guide
from seq2seq.testing import BOS, EOS, PAD, random_batch, tiny_model
from seq2seq.testing import VOCAB as V


def test_an_ensemble_of_one_decodes_as_its_model():
    model = tiny_model(seed=2)
    one = Ensemble([model])
    src, src_keep, tgt, tgt_keep = random_batch()
    assert torch.equal(greedy(one, src, src_keep, bos=BOS, eos=EOS, max_len=12),
                       greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=12))
    ours, theirs = (beam_search(m, src, src_keep, bos=BOS, eos=EOS, max_len=12, beam=4, n_best=4) for m in (one, model))
    assert torch.equal(ours.tokens, theirs.tokens)
    torch.testing.assert_close(ours.scores, theirs.scores)
    torch.testing.assert_close(one(src, src_keep, tgt, tgt_keep), model(src, src_keep, tgt, tgt_keep).log_softmax(-1))


def test_an_ensemble_searches_the_mean_of_its_members_log_probabilities():
    members = [tiny_model(seed=s) for s in (0, 1)] + [tiny_model(seed=2, d_model=16, n_heads=2)]
    ensemble = Ensemble(members)
    src, src_keep, _, _ = random_batch()
    # Reference: greedy over the members' full teacher-forced passes, averaged by hand at every step.
    tokens = torch.full((src.shape[0], 1), BOS)
    for _ in range(10):
        keep = torch.ones_like(tokens, dtype=torch.bool)
        mean = torch.stack([m(src, src_keep, tokens, keep)[:, -1].log_softmax(-1) for m in members]).mean(0)
        tokens = torch.cat([tokens, mean.argmax(-1, keepdim=True)], 1)
    cached = greedy(ensemble, src, src_keep, bos=BOS, eos=EOS, max_len=10)
    done = (tokens[:, 1:] == EOS).cumsum(1) > 0  # after EOS the search pads with EOS
    assert torch.equal(cached, tokens[:, 1:].masked_fill(done, EOS))
    # Beam search and guides run over it unchanged.
    decoder = Decoder(DecodeSpec(beam=3), BOS, EOS, PAD, V)
    guides = [Guide(prefix=(5,), include=((7, 8),))] * 4
    out = decoder(ensemble, src, src_keep, guides)
    assert (out[:, 0] == 5).all()
    assert all(any(row[i : i + 2] == [7, 8] for i in range(len(row) - 1)) for row in out.tolist())
