"""Every built-in domain passes the conformance kit that plugin authors run (`seq2seq.testing`)."""

import pytest

from seq2seq import testing

DOMAINS = {
    "synthetic": ["experiment=reverse", "model=tiny"],
    "text": ["experiment=translate_ko_en", "model=tiny", "tokenizer.src.vocab_size=500"],
    "series": ["experiment=storm_onset", "model=tiny"],
}


@pytest.fixture(params=DOMAINS, ids=list(DOMAINS))
def overrides(request):
    return DOMAINS[request.param]


def test_tokenizers(overrides):
    testing.check_tokenizers(overrides)


def test_contracts(overrides):
    testing.check_contracts(overrides)


def test_checkpoint_round_trip(overrides, tmp_path):
    testing.check_checkpoint(overrides, tmp_path)


def test_must_learn(overrides, tmp_path):
    testing.check_must_learn(overrides, tmp_path, n_examples=8)
