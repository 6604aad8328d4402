"""Text end to end: a tiny task must overfit, and `seq2seq translate` works from its checkpoint alone."""

import json
import subprocess
import sys

import pandas as pd
import pytest
import sacrebleu

from seq2seq import ConfigError, DataError, Translator, compose, train
from seq2seq.guides import Term
from seq2seq_plugins.text import EMBEDDED

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny_translation")
    pairs = pd.read_csv(EMBEDDED, sep="\t", dtype=str, keep_default_na=False)
    pairs = pairs[(pairs["split"] == "train") & (pairs["en"].str.len().between(10, 40))].head(24)
    corpus = pd.concat([pairs.assign(split=s) for s in ("train", "val", "test")])  # memorize: same pairs everywhere
    corpus.to_csv(tmp / "tiny.tsv", sep="\t", index=False)
    config = compose([
        "experiment=translate_ko_en", f"data.path={tmp / 'tiny.tsv'}", "tokenizer.src.vocab_size=400",
        "tokenizer.src.min_frequency=1", "model.d_model=64", "model.n_heads=4", "model.d_ff=128",
        "model.n_encoder_layers=2", "model.n_decoder_layers=2", "model.dropout=0.0", "optim.label_smoothing=0.0",
        "optim.schedule=constant", "optim.warmup_steps=40", "optim.lr=3e-3", "loader.batch_size=8",
        "trainer.max_epochs=120",
        "trainer.check_val_every_n_epoch=30", "monitor.patience=null", "trainer.enable_progress_bar=false"])
    module = train(config, tmp / "run")
    return tmp, module, json.loads((tmp / "run" / "metrics.json").read_text()), pairs


def test_a_tiny_translation_task_overfits_to_high_bleu(tiny_run):
    tmp, _, metrics, _ = tiny_run
    assert metrics["val/bleu"] >= 90 and metrics["val/chrf"] >= 90
    assert (tmp / "run" / "plots" / "attention.png").stat().st_size > 10_000
    version = sacrebleu.__version__  # how the scores were computed, as sacreBLEU signs them
    assert metrics["signatures"] == {"bleu": f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{version}",
                                     "chrf": f"nrefs:1|case:mixed|eff:no|nc:6|nw:0|space:no|version:{version}"}


def _translate(*args: str, stdin: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", "from seq2seq.cli import main; main()", "translate", *args],
                            input=stdin, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_translate_reads_stdin_and_prints_translations_from_the_checkpoint_alone(tiny_run):
    tmp, module, metrics, pairs = tiny_run
    sources, references = list(pairs["ko"][:6]), list(pairs["en"][:6])
    ckpt = metrics["best_checkpoint"]
    out = _translate(f"ckpt={ckpt}", "beam=5", f"hydra.run.dir={tmp / 't1'}", f"attention={tmp / 'att.png'}",
                     stdin="\n".join(sources) + "\n").stdout.removesuffix("\n").split("\n")
    assert len(out) == 6 and sum(o == r for o, r in zip(out, references, strict=True)) >= 5
    assert out == Translator(module).with_decoding(beam=5).translate(sources)
    assert (tmp / "att.png").stat().st_size > 10_000
    nbest = _translate(f"ckpt={ckpt}", "n_best=3", f"hydra.run.dir={tmp / 't2'}", stdin=sources[0] + "\n")
    rows = [line.split("\t") for line in nbest.stdout.splitlines()]
    assert [r[0] for r in rows] == ["1", "1", "1"]
    scores = [float(r[1]) for r in rows]
    assert scores == sorted(scores, reverse=True) and rows[0][2] == references[0]


def test_evaluate_scores_another_file_with_the_checkpoints_reader_and_column_names(tiny_run):
    from seq2seq.inference import evaluate

    tmp, _, metrics, pairs = tiny_run
    other = pairs.rename(columns={"ko": "source", "en": "target"})[["source", "target"]]
    other.assign(target=other["target"].str.upper()).to_csv(tmp / "other.csv", index=False)  # what it never saw
    ckpt = f"ckpt={metrics['best_checkpoint']}"
    scores = evaluate(compose([ckpt, f"data.path={tmp / 'other.csv'}", "data.source=source", "data.target=target",
                               "data.split_column=null", "data.val_fraction=0.5", "data.test_fraction=0.5"],
                              command="evaluate"))
    assert scores["val/bleu"] < 20 < metrics["val/bleu"]  # scored on the other file, not the stored one
    with pytest.raises(DataError, match=r"missing column\(s\) \['ko', 'en'\]"):
        evaluate(compose([ckpt, f"data.path={tmp / 'other.csv'}", "data.split_column=null"], command="evaluate"))


def _new_word(reference: str, others: list[str]) -> str:
    """A word of another reference that `reference` lacks: in the vocabulary, and not what the model would say."""
    return next(w for o in others for w in o.split() if w.isalpha() and len(w) > 3 and w not in reference)


def test_prefixes_and_glossary_terms_steer_translate_and_evaluate_reports_term_usage(tiny_run):
    from seq2seq.inference import evaluate

    tmp, module, metrics, pairs = tiny_run
    sources, references = list(pairs["ko"][:4]), list(pairs["en"][:4])
    ckpt = metrics["best_checkpoint"]
    prefix = " ".join(references[1].split()[:2])  # sentence 0 made to start like sentence 1
    (tmp / "prefix.txt").write_text(f"{prefix}\n\n\n\n")
    term = _new_word(references[2], references)
    source_word = sources[2].split()[0]
    (tmp / "glossary.tsv").write_text(f"{source_word}\t{term}\n")
    out = _translate(f"ckpt={ckpt}", "beam=4", f"prefix={tmp / 'prefix.txt'}", f"glossary={tmp / 'glossary.tsv'}",
                     f"hydra.run.dir={tmp / 't3'}", stdin="\n".join(sources) + "\n").stdout.splitlines()
    assert out[0].startswith(prefix) and out[0] != references[0]
    matched = [Term(source_word, term).occurs_in(s) for s in sources]
    assert matched[2] and all(term in o for o, m in zip(out, matched, strict=True) if m)
    assert term not in references[2]
    plain = Translator(module).with_decoding(beam=4).translate(sources)
    unguided = [i for i in (1, 2, 3) if not matched[i]]
    assert [out[i] for i in unguided] == [plain[i] for i in unguided]  # decoded as without guides
    # The Python API: an excluded phrase the model would emit is avoided.
    translator = Translator(module).with_decoding(beam=4)
    avoid = references[3].split()[1]
    guided = translator.translate(sources[3:], translator.guides(1, exclude=[[avoid]]))
    assert avoid in plain[3] and avoid not in guided[0].split()

    scores = evaluate(compose([f"ckpt={ckpt}", "beam=4", f"glossary={tmp / 'glossary.tsv'}"], command="evaluate"))
    n = int(scores["test/glossary/terms"])
    assert n == sum(source_word in s for s in pairs["ko"]) >= 1
    assert scores["test/glossary/term_usage"] == 1.0 > scores["test/term_usage"]
    assert scores["test/glossary/bleu"] < scores["test/bleu"]  # the forced term is not in the references



def test_an_ensemble_of_checkpoints_translates_and_evaluates_as_one_model(tiny_run, tmp_path):
    from seq2seq.inference import evaluate
    from seq2seq.testing import build, fit

    tmp, _, metrics, pairs = tiny_run
    sources = list(pairs["ko"][:6])
    best, last = metrics["best_checkpoint"], str(tmp / "run" / "checkpoints" / "last.ckpt")
    out = _translate(f"ckpt={best}", f"ensemble=[{last}]", "beam=3", f"hydra.run.dir={tmp / 't4'}",
                     stdin="\n".join(sources) + "\n").stdout.splitlines()
    together = Translator.ensemble([best, last]).with_decoding(beam=3)
    assert together.backend.name == "eager ensemble of 2" and out == together.translate(sources)
    scores = evaluate(compose([f"ckpt={best}", f"ensemble=[{last}]"], command="evaluate"))
    alone = evaluate(compose([f"ckpt={best}"], command="evaluate"))
    assert scores["test/bleu"] > 80 and abs(scores["test/loss"] - alone["test/loss"]) > 1e-4  # the ensemble scored

    other, other_pairs = build(["experiment=reverse", "model.d_model=32", "model.d_ff=64"], 8)  # another vocabulary
    fit(other, other_pairs, 1, tmp_path).save_checkpoint(tmp_path / "reverse.ckpt")
    with pytest.raises(ConfigError, match="different fitted tokenizers"):
        Translator.ensemble([best, tmp_path / "reverse.ckpt"])
