"""`seq2seq evaluate source=FILE reference=FILE`: a whole file scored line by line, checked before any decoding."""

import json

import pytest
import sacrebleu

from seq2seq import Translator, compose
from seq2seq.errors import ConfigError, DataError
from seq2seq.inference import evaluate


def _files(folder, sources, references):
    (folder / "src.ko").write_text("".join(f"{s}\n" for s in sources))
    (folder / "ref.en").write_text("".join(f"{r}\n" for r in references))
    return [f"source={folder / 'src.ko'}", f"reference={folder / 'ref.en'}"]


def test_every_line_of_a_source_file_is_decoded_and_scored_against_its_reference(text_run, tmp_path):
    ckpt = text_run[0]
    sources = [f"문장 {i} 번" for i in range(70)]  # more than a batch
    references = [f"sentence {i}" for i in range(70)]
    files = _files(tmp_path, sources, references)
    results = evaluate(compose([f"ckpt={ckpt}", *files, f"output={tmp_path / 'scores'}"], "evaluate"))
    translator = Translator.from_checkpoint(ckpt)
    outputs, tok = translator.translate(sources), translator.module.tgt_tok
    seen = [tok.decode(tok.encode(r).tolist()) for r in references]  # as the metrics see the val and test splits
    assert results["test/examples"] == 70
    assert results["test/bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [seen]).score, abs=1e-3)
    assert json.loads((tmp_path / "scores" / "metrics.json").read_text())["test/examples"] == 70
    own = evaluate(compose([f"ckpt={ckpt}", *_files(tmp_path, sources, outputs)], "evaluate"))
    assert own["test/bleu"] == pytest.approx(100.0) and own["test/chrf"] == pytest.approx(100.0)  # line by line


@pytest.mark.parametrize(("sources", "references", "args", "message"), [
    (["a", "b"], ["x"], [], r"has 2 lines and `reference=.*` 1; they must be aligned"),
    (["a", ""], ["x", "y"], [], r"`source=.*`: blank or undecodable line\(s\) 2;"),
    (["a"], ["x"], ["data.path=other.tsv"], r"drop `data\.\*` and `glossary`"),
])
def test_a_bad_pair_of_files_is_refused_before_the_checkpoint_loads(tmp_path, sources, references, args, message):
    files = _files(tmp_path, sources, references)
    with pytest.raises((ConfigError, DataError), match=message):  # the checkpoint does not even exist
        evaluate(compose([f"ckpt={tmp_path / 'none.ckpt'}", *files, *args], "evaluate"))
    with pytest.raises(ConfigError, match=r"give both `source=FILE` and `reference=FILE`"):
        evaluate(compose([f"ckpt={tmp_path / 'none.ckpt'}", files[0]], "evaluate"))
    with pytest.raises(ConfigError, match=r"`source=.*missing.ko`: No such file"):
        evaluate(compose([f"ckpt={tmp_path / 'none.ckpt'}", f"source={tmp_path / 'missing.ko'}", files[1]],
                         "evaluate"))
