"""Prepared datasets: fingerprints, sampled fitting, the same examples and batches as encoding in memory, shards,
workers, and what happens to damaged or unfinished ones."""

import errno
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from seq2seq import compose
from seq2seq.build import load_tokenizers
from seq2seq.data import TrainingBatches
from seq2seq.errors import DataError, StorageError
from seq2seq.prepared import Prepared
from seq2seq.preparing import _Shards, inputs_of, obtain, prepare_dataset
from seq2seq.registry import DATASETS

TEXT = ["experiment=translate_ko_en", "tokenizer.src.vocab_size=400"]


def _text_corpus(tmp_path, n=300):
    path = tmp_path / "corpus.tsv"
    path.write_text("ko\ten\tsplit\n" + "".join(
        f"문장 {i} 번{'입니다' * (i % 4)}\tsentence {i}{' again' * (i % 5)}\t{('train', 'val', 'test')[i % 3]}\n"
        for i in range(n)))
    return path


def _config(tmp_path, *overrides):
    return compose([*TEXT, f"data.path={_text_corpus(tmp_path)}", *overrides])


def _prepare(config, dest, **kwargs):
    return prepare_dataset(config, DATASETS.build(config.data, "data"), dest, **kwargs)


def test_prepared_examples_and_batches_equal_encoding_in_memory(tmp_path):
    config = _config(tmp_path)
    prepared = _prepare(config, tmp_path / "p", shard_size=40)  # several shards per split
    reader = DATASETS.build(config.data, "data")
    src_tok, tgt_tok = load_tokenizers(config, prepared.tokenizers)
    for split in ("train", "val", "test"):
        pairs = reader.read(split).pairs
        dataset = prepared.dataset(split)
        assert len(dataset) == len(pairs) == prepared.report(split)["kept"]
        in_memory = [(src_tok.encode(s), tgt_tok.encode(t)) for s, t in pairs]
        for (src, tgt), (mem_src, mem_tgt) in zip((dataset[i] for i in range(len(dataset))), in_memory, strict=True):
            assert src.dtype == torch.long and torch.equal(src, mem_src) and torch.equal(tgt, mem_tgt)
    assert len(prepared.meta["splits"]["train"]["shards"]["0"]) == 3  # 100 training pairs, 40 a shard
    src_len, tgt_len = prepared.dataset("train").lengths()  # from the lengths index alone
    train = reader.read("train").pairs
    lengths = [max(len(src_tok.encode(s)), len(tgt_tok.encode(t)) + 1) for s, t in train]
    assert np.array_equal(np.maximum(src_len, tgt_len + 1), lengths)
    ours, theirs = TrainingBatches(np.maximum(src_len, tgt_len + 1), 256, seed=7), TrainingBatches(lengths, 256, seed=7)
    assert list(ours) == list(theirs)


def test_a_prepared_dataset_is_reused_and_prepared_again_when_an_input_changes(tmp_path, caplog):
    config = _config(tmp_path)
    reader = DATASETS.build(config.data, "data")
    first = obtain(config, reader, tmp_path / "p")
    written = (tmp_path / "p" / "meta.json").stat().st_mtime_ns
    again = obtain(config, reader, tmp_path / "p", tokenizers=first.tokenizers)
    assert (tmp_path / "p" / "meta.json").stat().st_mtime_ns == written and again.fingerprint == first.fingerprint
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text(corpus.read_text() + "새 줄\ta new line\ttrain\n")
    with pytest.raises(DataError, match=r"corpus\.tsv changed \(\d+ -> \d+ bytes.*Prepare it again with"):
        obtain(config, reader, tmp_path / "p", strict=True, remedy="Prepare it again with ...")
    changed = obtain(config, reader, tmp_path / "p")  # the run's own cache is simply prepared again
    assert changed.fingerprint != first.fingerprint and changed.report("train")["examples_read"] == 101
    other = compose([*TEXT, f"data.path={corpus}", "data.max_chars=50"])
    with pytest.raises(DataError, match=r"`data\.max_chars`: 1000 -> 50"):
        obtain(other, DATASETS.build(other.data, "data"), tmp_path / "p", strict=True)
    with pytest.raises(DataError, match=r"the tokenizers"):
        obtain(config, reader, tmp_path / "p", tokenizers={"src": {"json": "{}"}, "tgt": None}, strict=True)


def test_sampled_tokenizer_fitting_is_reproducible_and_uses_the_sample(tmp_path):
    config = _config(tmp_path, "tokenizer.fit_sample=20")
    one, two = _prepare(config, tmp_path / "one"), _prepare(config, tmp_path / "two")
    assert one.tokenizers == two.tokenizers
    full = _prepare(_config(tmp_path), tmp_path / "full")
    assert one.tokenizers != full.tokenizers
    assert one.fingerprint != full.fingerprint  # the option is part of what a dataset is prepared from


@pytest.mark.slow  # a Python start per worker
def test_workers_write_the_same_dataset_as_one_process(tmp_path):
    config = _config(tmp_path)
    one = _prepare(config, tmp_path / "one", shard_size=70)
    two = _prepare(config, tmp_path / "two", tokenizers=one.tokenizers, workers=2, shard_size=70)
    assert one.meta["splits"] == two.meta["splits"]
    for name in os.listdir(tmp_path / "one"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name


def test_a_damaged_shard_is_detected_and_never_trained_on(tmp_path):
    prepared = _prepare(_config(tmp_path), tmp_path / "p")
    shard = tmp_path / "p" / prepared.meta["splits"]["train"]["shards"]["0"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-0-00000\.arrow has \d+ bytes, not the \d+ written.*damaged"):
        Prepared(tmp_path / "p")
    config = _config(tmp_path)
    with pytest.raises(DataError, match=r"damaged"):
        obtain(config, DATASETS.build(config.data, "data"), tmp_path / "p", strict=True)
    again = obtain(config, DATASETS.build(config.data, "data"), tmp_path / "p")  # what `seq2seq prepare` does
    assert Prepared(tmp_path / "p").fingerprint == again.fingerprint and len(again.dataset("train")) == 100
    shard.write_bytes(shard.read_bytes()[:-100])
    shard.unlink()
    with pytest.raises(DataError, match=r"is missing"):
        Prepared(tmp_path / "p")
    with pytest.raises(DataError, match=r"is not a prepared dataset"):
        Prepared(tmp_path / "nothing")


def test_a_failed_preparation_leaves_the_previous_dataset_whole(tmp_path, monkeypatch):
    config = _config(tmp_path)
    before = _prepare(config, tmp_path / "p")
    files = sorted(os.listdir(tmp_path / "p"))
    write = _Shards.write

    def disk_full(self, key, batch):
        if key[0] == "val":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(self, key, batch)

    monkeypatch.setattr(_Shards, "write", disk_full)
    with pytest.raises(StorageError, match=r"cannot write the prepared dataset .*p: No space left on device "
                                           r"\([\d,]+ MiB free there\); the dataset there before is intact"):
        _prepare(_config(tmp_path, "data.max_chars=60"), tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == files and sorted(os.listdir(tmp_path)) == ["corpus.tsv", "p"]
    assert Prepared(tmp_path / "p").fingerprint == before.fingerprint


def test_an_interrupted_preparation_is_removed_and_prepared_again(tmp_path):
    config = _config(tmp_path)
    stale = tmp_path / "p.partial-12345"  # what a killed `seq2seq prepare` leaves
    stale.mkdir()
    (stale / "train-0-00000.arrow").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="not a prepared dataset"):
        Prepared(tmp_path / "p")  # a partial one is never read
    prepared = _prepare(config, tmp_path / "p")
    assert not stale.exists() and prepared.report("train")["kept"] == 100


def test_rows_rejected_when_preparing_are_counted_per_split_and_file(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text("ko\ten\tsplit\n표\tTable\ttrain\n\t\ttrain\n빈\t\ttrain\n셀\tcell\tval\n행\trow\ttest\n")
    config = compose([*TEXT, f"data.path={path}"])
    prepared = _prepare(config, tmp_path / "p")
    counts = {"lines_read": 3, "examples_read": 3, "kept": 1, "rejected": {"blank line": 1, "empty target": 1}}
    assert prepared.report("train") == {**counts, "files": {str(path): counts}}


def test_the_fingerprint_follows_the_data_files_and_options(tmp_path):
    config = _config(tmp_path)
    reader = DATASETS.build(config.data, "data")
    inputs = inputs_of(config, reader)
    assert [f["path"] for f in inputs["files"]] == [str(tmp_path / "corpus.tsv")]
    assert inputs["data"]["path"] == str(tmp_path / "corpus.tsv") and "bytes" in inputs["files"][0]
    json.dumps(inputs)  # plain data: it goes into meta.json


def test_weighted_corpora_draw_in_the_configured_proportions():
    sizes, weights = (900, 100, 3000), (1.0, 2.0, 1.0)
    bounds = np.cumsum([0, *sizes])
    corpora = [(int(a), int(b), w) for a, b, w in zip(bounds[:-1], bounds[1:], weights, strict=True)]
    lengths = np.random.default_rng(0).integers(1, 30, bounds[-1])
    sampler = TrainingBatches(lengths, max_tokens=256, seed=1, corpora=corpora)
    drawn = Counter()
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = np.concatenate([np.asarray(b) for b in sampler])
        assert len(indices) == bounds[-1]  # an epoch draws as many examples as there are
        drawn.update(np.searchsorted(bounds, indices, side="right") - 1)
    total = sum(drawn.values())
    for corpus, weight in enumerate(weights):
        share = drawn[corpus] / total
        expected = weight / sum(weights)
        assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / total) + 1e-3, (corpus, share)
    small = np.concatenate([np.asarray(b) for b in sampler])
    small = small[(small >= 900) & (small < 1000)]
    assert set(small.tolist()) == set(range(900, 1000))  # a corpus drawn more than its size: every example, again


def test_a_dataloader_with_worker_processes_reads_the_shards(tmp_path):
    from seq2seq.data import Collate, LoaderSpec
    from seq2seq.datamodule import Seq2SeqDataModule

    config = _config(tmp_path)
    prepared = _prepare(config, tmp_path / "p")
    src_tok, tgt_tok = load_tokenizers(config, prepared.tokenizers)
    loaders = [Seq2SeqDataModule(prepared, Collate.for_tokenizers(src_tok, tgt_tok),
                                 LoaderSpec(max_tokens=60, num_workers=n), 256) for n in (0, 2)]
    batches = []
    for dm in loaders:
        dm.setup()
        batches.append([(b.src.tolist(), b.tgt_out.tolist()) for b in dm.train_dataloader()])
    assert batches[0] == batches[1] and len(batches[0]) > 3


def test_train_maps_what_prepare_wrote_and_refuses_a_dataset_prepared_from_other_options(tmp_path):
    from seq2seq import prepare, train

    common = ["experiment=reverse", "model=tiny", "data.n_train=200", "data.n_val=16", "data.n_test=16",
              "trainer.max_steps=3", f"prepared={tmp_path / 'shared'}"]
    prepared = prepare(compose([*common, "workers=1"], command="prepare"))
    train(compose(common), tmp_path / "run")
    assert not (tmp_path / "run" / "prepared").exists()  # nothing prepared again
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["seq2seq"]["data"] == {"fingerprint": prepared.fingerprint, "path": str(tmp_path / "shared"),
                                       "tokenizers": prepared.meta["tokenizers_digest"]}
    assert ckpt["hyper_parameters"]["tokenizers"] == prepared.tokenizers
    with pytest.raises(DataError, match=r"does not match this config: `data\.n_train`: 200 -> 300\. Prepare it again"):
        train(compose([*common, "data.n_train=300"]), tmp_path / "other")
