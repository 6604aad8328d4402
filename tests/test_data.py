import random
from collections import Counter

import pytest
import torch

from seq2seq import compose
from seq2seq.data import IGNORE_INDEX, Collate, LoaderSpec, TrainingBatches
from seq2seq.datamodule import Seq2SeqDataModule
from seq2seq.domain import Reader, Rows
from seq2seq.errors import ConfigError, DataError
from seq2seq.preparing import prepare_dataset
from seq2seq_plugins.synthetic import SymbolTokenizer

BOS, EOS, PAD = 1, 2, 0


def _tokenizer() -> SymbolTokenizer:
    tok = SymbolTokenizer()
    tok.fit(["a b c d e"])
    return tok


class Listed(Reader):
    """A reader of rows given in advance."""

    def __init__(self, rows: list[Rows]) -> None:
        self.rows = rows

    def stream(self, splits):
        return (rows for rows in self.rows if rows.split in splits)

    def read_inputs(self, path):
        raise NotImplementedError


def _datamodule(tmp_path, rows: list[Rows], loader: LoaderSpec) -> Seq2SeqDataModule:
    tok = _tokenizer()
    config = compose(["experiment=reverse"])
    prepared = prepare_dataset(config, Listed(rows), tmp_path / "prepared", {"src": tok.state_dict(), "tgt": None},
                               splits=("train", "val"))
    return Seq2SeqDataModule(prepared, Collate.for_tokenizers(tok, tok), loader, max_positions=64)


def test_collate_pads_and_marks_bos_eos_and_ignored_positions():
    collate = Collate(src_pad=PAD, tgt_pad=PAD, bos=BOS, eos=EOS)
    batch = collate([(torch.tensor([5, 6, 7]), torch.tensor([8])), (torch.tensor([5]), torch.tensor([8, 9, 10]))])
    assert batch.src.tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch.src_keep.tolist() == [[True, True, True], [True, False, False]]
    assert batch.tgt_in.tolist() == [[BOS, 8, PAD, PAD], [BOS, 8, 9, 10]]
    assert batch.tgt_out.tolist() == [[8, EOS, IGNORE_INDEX, IGNORE_INDEX], [8, 9, 10, EOS]]
    assert batch.tgt_keep.tolist() == [[True, True, False, False], [True] * 4]


def test_collate_pads_numeric_sources_to_batch_length_features():
    collate = Collate(src_pad=0.0, tgt_pad=PAD, bos=BOS, eos=EOS)
    batch = collate([(torch.ones(4, 3), torch.tensor([5])), (torch.ones(2, 3), torch.tensor([6]))])
    assert batch.src.shape == (2, 4, 3)  # (B, S, F)
    assert batch.src[1, 2:].abs().sum() == 0 and batch.src_keep.sum().item() == 6


def test_over_long_and_empty_examples_are_rejected_and_counted_by_reason(tmp_path):
    rows = [Rows("train", [("a b c", "a"), ("a b c d e", "a"), ("", "a"), ("a", "a b c d")],
                 Counter({"malformed row": 1}), "one.tsv"),
            Rows("train", [("a b", "b")], file="two.tsv"), Rows("val", [("c", "c")], file="two.tsv")]
    dm = _datamodule(tmp_path, rows, LoaderSpec(batch_size=2, max_src_len=4, max_tgt_len=4))
    dm.setup("fit")
    assert dm.report["train"]["rejected"] == {"malformed row": 1, "source longer than 4": 1, "empty source": 1,
                                              "target longer than 3": 1}
    assert dm.report["train"]["examples_read"] == 6 and dm.report["train"]["kept"] == 2
    assert dm.report["train"]["files"] == {
        "one.tsv": {"lines_read": 5, "examples_read": 5, "kept": 3,
                    "rejected": {"malformed row": 1, "empty source": 1}},
        "two.tsv": {"lines_read": 1, "examples_read": 1, "kept": 1,
                    "rejected": {}}}  # the length limits apply when training
    assert sorted(len(s) for s, _ in dm.examples["train"]) == [2, 3]
    batch = next(iter(dm.val_dataloader()))
    assert batch.src.tolist() == [[_tokenizer().stoi["c"]]]


def test_a_split_left_with_no_examples_is_a_data_error_with_the_counts(tmp_path):
    rows = [Rows("train", [("a b c", "c b a")]), Rows("val", [], Counter({"blank line": 2}))]
    with pytest.raises(DataError, match=r"the val split has no examples: 2 read, rejected by reason \{'blank line'"):
        _datamodule(tmp_path, rows, LoaderSpec()).setup()


def test_symbol_tokenizer_round_trips_and_names_unknown_symbols():
    tok = _tokenizer()
    assert tok.decode(tok.encode("c a e").tolist()) == "c a e"
    assert tok.decode([BOS, tok.stoi["a"], EOS, PAD]) == "a"
    restored = SymbolTokenizer()
    restored.load_state_dict(tok.state_dict())
    assert restored.itos == tok.itos
    with pytest.raises(ValueError, match="'z'.*not in the vocabulary"):
        tok.encode("a z")


def test_token_budget_batches_hold_every_example_once_within_the_budget():
    lengths = [random.Random(i).randint(1, 40) for i in range(500)]
    sampler = TrainingBatches(lengths, max_tokens=128, seed=3)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert all(max(lengths[i] for i in b) * len(b) <= 128 for b in batches)
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != first, "each epoch reshuffles"
    padded = sum(max(lengths[i] for i in b) * len(b) for b in first)
    assert sum(lengths) / padded > 0.9, "similar lengths batch together"


def test_token_budget_batches_give_every_rank_the_same_number_of_steps():
    lengths = [random.Random(i).randint(1, 30) for i in range(301)]
    ranks = [list(TrainingBatches(lengths, 64, seed=5, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    assert {i for r in ranks for b in r for i in b} == set(range(301))
    with pytest.raises(ConfigError, match="max_tokens"):
        TrainingBatches([10, 70], 64)
