"""Every built-in domain passes the conformance kit that plugin authors run (`seq2seq.testing`)."""

import dataclasses

import pytest

from seq2seq import testing
from seq2seq.registry import TOKENIZERS
from seq2seq_plugins.synthetic import SymbolTokenizer
from seq2seq_plugins.text import ParallelCorpus
from seq2seq_plugins.text.tokenizers import BPETokenizer

DOMAINS = {
    "synthetic": ["experiment=reverse", "model=tiny"],
    "text": ["experiment=translate_ko_en", "model=tiny", "tokenizer.src.vocab_size=500"],
    "series": ["experiment=storm_onset", "model=tiny"],
    "series_covariates": ["experiment=typhoon_onset", "model=tiny"],
}


@pytest.fixture(params=DOMAINS, ids=list(DOMAINS))
def overrides(request):
    return DOMAINS[request.param]


# The fresh-process round trip costs a Python start per domain: the quick loop keeps one.
ROUND_TRIPS = [pytest.param(DOMAINS[name], id=name, marks=() if name == "synthetic" else pytest.mark.slow)
               for name in DOMAINS]


def test_tokenizers(overrides):
    testing.check_tokenizers(overrides)


def test_rows(overrides, tmp_path):
    testing.check_rows(overrides, tmp_path)


def test_the_kit_catches_a_reader_that_drops_rows_silently(tmp_path, monkeypatch):
    stream = ParallelCorpus.stream

    def dropping(self, splits):
        for rows in stream(self, splits):
            yield dataclasses.replace(rows, pairs=rows.pairs[1:])  # one row gone, counted nowhere

    monkeypatch.setattr(ParallelCorpus, "stream", dropping)
    with pytest.raises(AssertionError, match=r"the train split read 9 rows of the sample, which holds 10"):
        testing.check_rows(DOMAINS["text"], tmp_path)


def test_contracts(overrides):
    testing.check_contracts(overrides)


@pytest.mark.parametrize("overrides", ROUND_TRIPS)
def test_checkpoint_round_trip(overrides, tmp_path):
    testing.check_checkpoint(overrides, tmp_path)


@pytest.mark.slow  # ONNX export costs seconds a graph: the quick loop exports in test_export alone
@pytest.mark.parametrize("overrides", DOMAINS.values(), ids=list(DOMAINS))
def test_export(overrides, tmp_path):
    testing.check_export(overrides, tmp_path)


@pytest.mark.slow
def test_must_learn(overrides, tmp_path):
    testing.check_must_learn(overrides, tmp_path, n_examples=8)


# Plugin bugs the kit must catch, each with a message that names the cause.
@TOKENIZERS.register("kit_test_lowercasing_bpe")
class LowercasingBPE(BPETokenizer):
    def encode(self, item: str):
        return super().encode(item.lower())


@TOKENIZERS.register("kit_test_spaceless_symbols")
class SpacelessSymbols(SymbolTokenizer):
    def decode(self, ids: list[int]) -> str:
        return super().decode(ids).replace(" ", "")


@TOKENIZERS.register("kit_test_stateless_symbols")
class StatelessSymbols(SymbolTokenizer):
    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:  # what `fit` passes; the empty saved state changes nothing
            super().load_state_dict(state)


@pytest.mark.parametrize(("overrides", "message"), [
    (["experiment=translate_ko_en", "tokenizer.src.name=kit_test_lowercasing_bpe", "tokenizer.src.vocab_size=300"],
     r"decode\(encode\(.*\)\) gives .*must declare `lossless = False`"),
    (["experiment=reverse", "tokenizer.src.name=kit_test_spaceless_symbols"], r"must declare `lossless = False`"),
    (["experiment=reverse", "tokenizer.src.name=kit_test_stateless_symbols"],
     r"rebuilt from its `state_dict\(\)` cannot encode .*does `state_dict\(\)` hold the fitted state\?"),
])
def test_the_kit_catches_tokenizer_bugs_and_names_the_cause(overrides, message):
    with pytest.raises(AssertionError, match=message):
        testing.check_tokenizers([*overrides, "model=tiny"])
