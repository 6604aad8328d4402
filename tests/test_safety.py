"""Nothing lost, nothing trusted blindly. What writing commands may replace: for each one, a user's file at or
under the path it is told to write survives unless `force=true`, an output that is one of its inputs is refused even
forced, and a refusal comes before any work. What a checkpoint may import: installed plugins, and what the user
names."""

import json
import sys

import pytest
import torch
from conftest import TINY_TEXT, text_corpus

from seq2seq import compose, plugins
from seq2seq.errors import ConfigError
from seq2seq.inference import average, evaluate, export, predict, translate
from seq2seq.module import Seq2SeqModule
from seq2seq.runs import RunDir
from seq2seq.training import prepare

USER = "a user's notes\n"


def _user_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(USER)
    return path


def _survives(path):
    return path.read_text() == USER


def test_prepare_keeps_a_users_folder_unless_forced_and_never_replaces_the_folder_of_its_corpus(tmp_path):
    corpus = text_corpus(tmp_path / "corpus")
    mine = _user_file(tmp_path / "mine" / "notes.txt")
    base = [*TINY_TEXT, f"data.path={corpus}"]
    with pytest.raises(ConfigError, match=r"`prepared=.*mine` holds 1 file\(s\) seq2seq did not write there "
                                          r"\(notes.txt\).*force=true"):
        prepare(compose([*base, f"prepared={mine.parent}"], "prepare"))
    assert _survives(mine)
    for force in ("false", "true"):
        with pytest.raises(ConfigError, match=r"`prepared=.*corpus` holds the input .*corpus.tsv"):
            prepare(compose([*base, f"prepared={corpus.parent}", f"force={force}"], "prepare"))
        assert corpus.stat().st_size > 1000
    prepared = prepare(compose([*base, f"prepared={mine.parent}", "force=true"], "prepare"))
    assert not mine.exists() and (prepared.path / "meta.json").is_file()
    report = json.loads((prepared.path / "data_report.json").read_text())  # what `prepare` read, kept, rejected
    assert sum(entry["examples_read"] for entry in report.values()) == 120
    prepare(compose([*base, f"prepared={mine.parent}", "seed=3"], "prepare"))  # its own: replaced, not refused


def test_a_new_run_refuses_a_directory_holding_anything_but_what_hydra_writes_first(tmp_path):
    _user_file(tmp_path / "prepared" / "meta.json")
    with pytest.raises(ConfigError, match=r"holds files that are not a run's \(prepared\)"):
        RunDir(tmp_path).refuse_reuse()
    assert _survives(tmp_path / "prepared" / "meta.json")
    (tmp_path / "prepared" / "meta.json").unlink()
    (tmp_path / "prepared").rmdir()
    _user_file(tmp_path / "cli.log")
    RunDir(tmp_path).refuse_reuse()  # Hydra's log of this run


@pytest.mark.parametrize("command", ["predict", "translate"])
def test_predict_and_translate_refuse_their_input_as_output_and_a_users_file_unless_forced(text_run, tmp_path,
                                                                                         command):
    ckpt, _, sources = text_run
    act = {"predict": predict, "translate": translate}[command]
    text = sources.read_text()
    with pytest.raises(ConfigError, match=r"`output=.*sources.ko` is the input"):
        act(compose([f"ckpt={ckpt}", f"input={sources}", f"output={sources}", "force=true"], command))
    assert sources.read_text() == text
    mine = _user_file(tmp_path / "out.en")
    with pytest.raises(ConfigError, match=r"exists and was not written by seq2seq.*force=true"):
        act(compose([f"ckpt={ckpt}", f"input={sources}", f"output={mine}"], command))
    assert _survives(mine)
    with pytest.raises(ConfigError, match=r"the folder .*nowhere does not exist"):
        act(compose([f"ckpt={ckpt}", f"input={sources}", f"output={tmp_path / 'nowhere' / 'out'}"], command))
    with pytest.raises(ConfigError, match=r"`input=.*missing.ko`: no such file"):
        act(compose([f"ckpt={ckpt}", f"input={tmp_path / 'missing.ko'}", f"output={tmp_path / 'o'}"], command))
    act(compose([f"ckpt={ckpt}", f"input={sources}", f"output={mine}", "force=true"], command))
    assert len(mine.read_text().splitlines()) == 2
    act(compose([f"ckpt={ckpt}", f"input={sources}", f"output={mine}"], command))  # its own output now
    assert json.loads((tmp_path / "out.en.json").read_text())["checkpoint"] == ckpt


def test_export_keeps_a_users_file_beside_an_earlier_export_unless_forced(text_run, tmp_path):
    ckpt = text_run[0]
    out = tmp_path / "ct2"
    args = [f"ckpt={ckpt}", "format=ctranslate2", f"output={out}", "check=null"]
    export(compose(args, "export"))
    export(compose(args, "export"))  # an earlier export alone: replaced
    mine = _user_file(out / "README.txt")
    with pytest.raises(ConfigError, match=r"holds 1 file\(s\) seq2seq did not write there \(README.txt\)"):
        export(compose(args, "export"))
    assert _survives(mine) and (out / "seq2seq_export.json").is_file()
    export(compose([*args, "force=true"], "export"))
    assert not mine.exists() and (out / "seq2seq_export.json").is_file()


def test_average_refuses_a_users_file_and_its_own_inputs(text_run, tmp_path):
    ckpt = text_run[0]
    mine = _user_file(tmp_path / "avg.ckpt")
    with pytest.raises(ConfigError, match=r"exists and was not written by seq2seq"):
        average(compose([f"ckpts=[{ckpt},{ckpt}]", f"output={mine}"], "average"))
    assert _survives(mine)
    with pytest.raises(ConfigError, match=r"is the input"):
        average(compose([f"ckpts=[{ckpt},{ckpt}]", f"output={ckpt}", "force=true"], "average"))
    average(compose([f"ckpts=[{ckpt},{ckpt}]", f"output={mine}", "force=true"], "average"))
    average(compose([f"ckpts=[{ckpt},{ckpt}]", f"output={mine}"], "average"))  # a checkpoint now: replaced


def test_evaluate_refuses_a_file_or_a_users_folder_as_its_output_folder(text_run, tmp_path):
    ckpt = text_run[0]
    mine = _user_file(tmp_path / "scores.json")
    with pytest.raises(ConfigError, match=r"`output=.*scores.json` is a file; name a folder"):
        evaluate(compose([f"ckpt={ckpt}", f"output={mine}"], "evaluate"))
    assert _survives(mine)
    with pytest.raises(ConfigError, match=r"holds 1 file\(s\) seq2seq did not write there \(scores.json\)"):
        evaluate(compose([f"ckpt={ckpt}", f"output={tmp_path}"], "evaluate"))
    assert _survives(mine)


def test_a_checkpoint_imports_only_installed_plugins_or_those_the_user_names(text_run, tmp_path, monkeypatch):
    ckpt = torch.load(text_run[0], weights_only=True)
    ckpt["seq2seq"]["plugins"]["calendar"] = "python"  # an installed module that is no seq2seq plugin
    edited = tmp_path / "edited.ckpt"
    torch.save(ckpt, edited)
    monkeypatch.delitem(sys.modules, "calendar", raising=False)
    monkeypatch.setattr(plugins, "_TRUSTED", set())  # what this test trusts ends with it
    with pytest.raises(ConfigError, match=r"records the plugin module `calendar`, which is not installed as a "
                                          r"seq2seq plugin .* name it: `plugins=\[calendar\]`"):
        Seq2SeqModule.from_checkpoint(edited)
    assert "calendar" not in sys.modules
    out = tmp_path / "out.en"
    translate(compose([f"ckpt={edited}", f"input={text_run[2]}", f"output={out}", "plugins=[calendar]"], "translate"))
    assert "calendar" in sys.modules and len(out.read_text().splitlines()) == 2


def test_an_export_the_disk_refuses_is_one_message_and_leaves_the_earlier_export(text_run, tmp_path, monkeypatch):
    import errno

    from seq2seq.errors import StorageError
    from seq2seq.export import ctranslate2

    out = tmp_path / "ct2"
    args = [f"ckpt={text_run[0]}", "format=ctranslate2", f"output={out}", "check=null"]
    export(compose(args, "export"))
    before = sorted(p.name for p in out.iterdir())

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(ctranslate2, "convert", read_only)
    with pytest.raises(StorageError, match=r"cannot write the export .*ct2: Read-only file system .* the export "
                                           r"there before is intact"):
        export(compose(args, "export"))
    assert sorted(p.name for p in out.iterdir()) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ct2"]


def test_translate_keeps_a_users_picture_at_the_attention_path_unless_forced(text_run, tmp_path):
    ckpt, _, sources = text_run
    mine = _user_file(tmp_path / "att.png")
    with pytest.raises(ConfigError, match=r"`attention=.*att.png` exists and was not written by seq2seq"):
        translate(compose([f"ckpt={ckpt}", f"input={sources}", f"attention={mine}"], "translate"))
    assert _survives(mine)
    translate(compose([f"ckpt={ckpt}", f"input={sources}", f"attention={mine}", "force=true"], "translate"))
    assert mine.read_bytes()[:4] == b"\x89PNG"
    translate(compose([f"ckpt={ckpt}", f"input={sources}", f"attention={mine}"], "translate"))  # its own now
