"""Exported models decode as the eager model does: CTranslate2 and ONNX, both norm orders and both position kinds."""

import csv
import io
import json
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn

from seq2seq import ConfigError, Translator, evaluate
from seq2seq.errors import ExportError
from seq2seq.export import is_export, require
from seq2seq.export.ctranslate2 import convert
from seq2seq.exporting import _check, export, parity
from seq2seq.registry import DATASETS
from seq2seq.schemas import EvaluateConfig
from seq2seq.testing import build, fit

VARIANTS = {"post-sinusoidal": ["model.norm_first=false", "model.positions=sinusoidal"],
            "pre-learned": ["model.norm_first=true", "model.positions=learned"],
            "pre-sinusoidal": ["model.norm_first=true", "model.positions=sinusoidal"],
            "post-learned": ["model.norm_first=false", "model.positions=learned", "model.activation=gelu"]}
ATTENTION = {"rope-gqa": ["model.norm_first=true", "model.positions=rope", "model.n_kv_heads=2"],
             "alibi": ["model.norm_first=false", "model.positions=alibi"]}  # ONNX only: CTranslate2 refuses them
TINY = ["model.d_model=32", "model.d_ff=64"]
# ONNX export costs seconds a graph: the quick loop exports one variant (post-norm, sinusoidal) and no other model.
SLOW_ONNX = ("pre-sinusoidal", "post-learned", "pre-learned")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A reverse-task model per variant after 30 training steps (peaked enough that searches differ), saved."""
    made = {}

    def make(variant: str):
        if variant not in made:
            root = tmp_path_factory.mktemp(variant)
            module, pairs = build(["experiment=reverse", *TINY, *{**VARIANTS, **ATTENTION}[variant]], 64)
            fit(module, pairs, 30, root).save_checkpoint(root / "model.ckpt")
            made[variant] = root / "model.ckpt"
        return made[variant]

    return make


def _val(ckpt, n=40):
    module = Translator.from_checkpoint(ckpt).module
    return DATASETS.build(module.config.data, "data").read("val").pairs[:n]


def _same_outputs(ckpt, folder):
    """The export, moved away from where it was written, decodes as the checkpoint does: greedy, beam, n-best."""
    moved = folder.parent / f"{folder.name}-moved"
    shutil.move(folder, moved)
    eager, exported = Translator.from_checkpoint(ckpt), Translator.from_checkpoint(moved)
    pairs = _val(ckpt)
    sources = [s for s, _ in pairs]
    assert exported.translate(sources) == eager.translate(sources)
    assert exported.with_decoding(beam=4).translate(sources) == eager.with_decoding(beam=4).translate(sources)
    ours, theirs = eager.n_best(sources, 1), exported.n_best(sources, 1)
    assert [o[0][1] for o in ours] == [t[0][1] for t in theirs]
    assert [t[0][0] for t in theirs] == pytest.approx([o[0][0] for o in ours], abs=1e-3)
    prefixes = [" ".join(pairs[i - 1][1].split()[:2]) for i in range(len(pairs))]  # another target's start
    guides = eager.guides(len(sources), prefixes)
    steered = eager.with_decoding(beam=4).translate(sources, guides)
    theirs = exported.with_decoding(beam=4).translate(sources, guides)
    assert all(out.startswith(p) for out, p in zip(steered + theirs, prefixes * 2, strict=True))
    assert steered != eager.with_decoding(beam=4).translate(sources)
    if exported.backend.name.startswith("ctranslate2"):  # it never ends right after a prefix: compare the others
        theirs, steered = zip(*[(t, s) for t, s, p in zip(theirs, steered, prefixes, strict=True) if s != p],
                              strict=True)
    assert theirs == steered


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ctranslate2_export_decodes_token_for_token_as_the_eager_model(checkpoints, variant, tmp_path):
    ckpt = checkpoints(variant)
    manifest = export(ckpt, "ctranslate2", tmp_path / "ct2", check_limit=60)
    report = manifest["parity"]
    assert report["examples"] == 60 and report["greedy_agreement"] == report["beam4_agreement"] == 1.0
    assert report["max_logprob_diff"] < 1e-3
    assert {"model.bin", "config.json", "module.pt", "seq2seq_export.json"} <= {p.name for p in (tmp_path / "ct2")
                                                                                  .iterdir()}
    _same_outputs(ckpt, tmp_path / "ct2")


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=[pytest.mark.slow] if v in SLOW_ONNX else []) for v in VARIANTS])
def test_onnx_export_decodes_token_for_token_with_the_core_search(checkpoints, variant, tmp_path):
    ckpt = checkpoints(variant)
    report = export(ckpt, "onnx", tmp_path / "onnx", check_limit=60)["parity"]
    assert report["greedy_agreement"] == report["beam4_agreement"] == 1.0 and report["max_logprob_diff"] < 1e-4
    assert Translator.from_checkpoint(tmp_path / "onnx").backend.name == "onnx"
    _same_outputs(ckpt, tmp_path / "onnx")


@pytest.mark.slow
@pytest.mark.parametrize("variant", ATTENTION)
def test_rotary_alibi_and_grouped_query_models_export_to_onnx_and_not_to_ctranslate2(checkpoints, variant, tmp_path):
    ckpt = checkpoints(variant)
    report = export(ckpt, "onnx", tmp_path / "onnx", check_limit=60)["parity"]
    assert report["greedy_agreement"] == report["beam4_agreement"] == 1.0 and report["max_logprob_diff"] < 1e-4
    _same_outputs(ckpt, tmp_path / "onnx")
    with pytest.raises(ConfigError, match=r"CTranslate2's encoder-decoder Transformer takes added position tables"):
        export(ckpt, "ctranslate2", tmp_path / "ct2")


def test_int8_export_reports_its_agreement_and_test_metrics_against_full_precision(checkpoints, tmp_path):
    ckpt = checkpoints("post-sinusoidal")
    report = export(ckpt, "ctranslate2", tmp_path / "int8", quantization="int8", check_limit=60)["parity"]
    assert set(report["metrics_eager"]) == set(report["metrics_export"]) == {"exact_match"}
    sources = [src for src, _ in _val(ckpt, 60)]  # the pairs the check decodes (every one fits these models)
    greedy = [t.with_decoding(beam=1, sampling=False).tokens(sources)
              for t in (Translator.from_checkpoint(ckpt), Translator.from_checkpoint(tmp_path / "int8"))]
    agreement = sum(a == b for a, b in zip(*greedy, strict=True)) / 60
    assert report["scored"] == 60 and report["greedy_agreement"] == pytest.approx(agreement) and agreement > 0.5
    # int8 weights move log-probabilities by hundredths; tied weights handed over wrongly moved them by thousands
    assert report["max_logprob_diff"] < 0.5
    assert Translator.from_checkpoint(tmp_path / "int8").backend.name == "ctranslate2 int8"


def test_an_export_that_decodes_differently_is_an_error(checkpoints, tmp_path):
    ckpt = checkpoints("post-sinusoidal")
    export(ckpt, "ctranslate2", tmp_path / "ct2", check=None)
    other = Translator.from_checkpoint(checkpoints("pre-learned"))  # same vocabulary, other weights
    report = parity(other, Translator.from_checkpoint(tmp_path / "ct2"), _val(ckpt))
    assert report["greedy_agreement"] < 1
    with pytest.raises(ExportError, match="greedy_agreement = .* on 40 examples"):
        _check(report, "ctranslate2", normalized=False)


SERIES = {"storm_onset": ["experiment=storm_onset"],
          # known-future covariates, decoded step by step through the step graph
          "typhoon_onset": ["experiment=typhoon_onset", "decode.one_shot=false"]}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", SERIES)
def test_series_models_export_to_onnx_with_their_label_probabilities(experiment, tmp_path):
    module, pairs = build([*SERIES[experiment], *TINY], 64)
    fit(module, pairs, 5, tmp_path).save_checkpoint(tmp_path / "m.ckpt")
    report = export(tmp_path / "m.ckpt", "onnx", tmp_path / "onnx", check_limit=30)["parity"]
    assert report["greedy_agreement"] == report["beam4_agreement"] == 1.0
    assert report["max_probability_diff"] < 1e-4
    reader = DATASETS.build(module.config.data, "data")
    windows = [w for w, _ in reader.read("test").pairs[:20]]
    written = []
    for ckpt in (tmp_path / "m.ckpt", tmp_path / "onnx"):  # what `seq2seq predict` writes, from each
        out = io.StringIO()
        reader.write_predictions(Translator.from_checkpoint(ckpt), windows, out)
        written.append(out.getvalue())
    eager_rows, onnx_rows = (list(csv.DictReader(io.StringIO(text))) for text in written)
    assert len(eager_rows) == 20 * 7
    probabilities = [c for c in eager_rows[0] if c.startswith("probability")]
    for column in eager_rows[0]:  # days, labels and alerts equal; probabilities within float error
        got, want = [r[column] for r in onnx_rows], [r[column] for r in eager_rows]
        if column in probabilities:
            assert list(map(float, got)) == pytest.approx(list(map(float, want)), abs=2e-6), column
        else:
            assert got == want, column
    with pytest.raises(ConfigError, match=r"source encoder \(Standardizer\) gives feature values: export format=onnx"):
        export(tmp_path / "m.ckpt", "ctranslate2", tmp_path / "ct2")
    assert not (tmp_path / "ct2").exists() and not list(tmp_path.glob("ct2.partial-*"))


def test_ctranslate2_refuses_lexical_constraints_by_name(checkpoints, tmp_path):
    export(checkpoints("post-sinusoidal"), "ctranslate2", tmp_path / "ct2", check=None)
    exported = Translator.from_checkpoint(tmp_path / "ct2")
    with pytest.raises(ConfigError, match="CTranslate2 has no per-input lexical constraints"):
        exported.translate(["1 2"], exported.guides(1, include=[["3"]]))


def test_components_ctranslate2_cannot_express_are_refused_by_name(tmp_path):
    module, _ = build(["experiment=reverse", *TINY])

    class Scaled(nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def forward(self, h):
            return 2 * self.head(h)

    module.model.head = Scaled(module.model.head)
    with pytest.raises(ConfigError, match="no place for the output head .*Scaled"):
        convert(module.model, module.src_tok, module.tgt_tok, tmp_path, "none")


def test_export_options_are_checked(checkpoints, tmp_path):
    ckpt = checkpoints("post-sinusoidal")
    with pytest.raises(ConfigError, match="`quantization` for `onnx` must be one of none"):
        export(ckpt, "onnx", tmp_path / "x", quantization="int8")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"holds 1 file\(s\) seq2seq did not write there \(notes.txt\)"):
        export(ckpt, "ctranslate2", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    export(ckpt, "ctranslate2", tmp_path / "again", check=None)
    export(ckpt, "ctranslate2", tmp_path / "again", check=None)  # an earlier export is replaced
    assert is_export(tmp_path / "again")
    with pytest.raises(ConfigError, match="scores the splits of checkpoints; .* is an exported model"):
        evaluate(EvaluateConfig(ckpt=str(tmp_path / "again")))
    with pytest.raises(ConfigError, match=r"no_such_engine not installed: pip install 'seq2seq\[deploy\]'"):
        require(("no_such_engine",), "deploy")


@pytest.mark.slow
def test_cli_exports_and_translates_with_the_exported_backend(checkpoints, tmp_path):
    ckpt = checkpoints("post-sinusoidal")
    run = subprocess.run([sys.executable, "-m", "seq2seq", "export", f"ckpt={ckpt}", "format=ctranslate2",
                          f"output={tmp_path / 'ct2'}", "check_limit=20"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["parity"]["greedy_agreement"] == 1.0
    sources = [s for s, _ in _val(ckpt, 8)]
    (tmp_path / "in.txt").write_text("".join(s + "\n" for s in sources))
    run = subprocess.run([sys.executable, "-m", "seq2seq", "translate", f"ckpt={tmp_path / 'ct2'}", "beam=4",
                          "n_best=2", "max_len_b=12", f"input={tmp_path / 'in.txt'}", f"output={tmp_path / 'out.txt'}"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    eager = Translator.from_checkpoint(ckpt).with_decoding(beam=4, max_len_b=12)
    lines = (tmp_path / "out.txt").read_text().splitlines()
    assert [line.split("\t")[2] for line in lines[::2]] == eager.translate(sources)
    meta = json.loads((tmp_path / "out.txt.json").read_text())
    assert meta["backend"] == "ctranslate2 none" and meta["beam"] == 4 and meta["max_len_b"] == 12
    run = subprocess.run([sys.executable, "-m", "seq2seq", "export", f"ckpt={ckpt}", "format=onnx",
                          f"output={tmp_path / 'o'}", "quantization=int8"], capture_output=True, text=True)
    assert run.returncode == 2 and "`quantization` for `onnx` must be one of none" in run.stderr


def test_parity_reports_are_recorded_in_the_manifest(checkpoints, tmp_path):
    ckpt = checkpoints("post-sinusoidal")
    export(ckpt, "ctranslate2", tmp_path / "ct2", check_limit=10)
    manifest = json.loads((tmp_path / "ct2" / "seq2seq_export.json").read_text())
    assert manifest["format"] == "ctranslate2" and manifest["checkpoint"] == str(ckpt)
    assert manifest["parity"]["split"] == "val" and manifest["parity"]["examples"] == 10
    assert torch.load(tmp_path / "ct2" / "module.pt", weights_only=True)["config"]["model"]["d_model"] == 32


def test_the_eager_backend_follows_the_model_where_it_moves():
    module, pairs = build(["experiment=reverse", *TINY])
    translator = Translator(module)  # built before the move, as the training report's translator is
    module.to("meta")
    _, batch = next(translator.batches([s for s, _ in pairs]))
    assert translator.backend.device.type == batch.src.device.type == "meta"
