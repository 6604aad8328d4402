"""Several processes on the CPU (2 gloo ranks, Lightning's `ddp` launcher re-running the command line)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from seq2seq import compose, train
from seq2seq_plugins.text import EMBEDDED

pytestmark = pytest.mark.slow
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
REVERSE = ["experiment=reverse", "data.n_val=64", "data.n_test=64", "trainer.log_every_n_steps=1"]


def _cli(*args: str, env: dict | None = None, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "seq2seq", *args], capture_output=True, text=True, timeout=300,
                            env=env, cwd=cwd)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def _state(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


def test_two_ranks_share_one_run_dir_and_stay_in_step_on_uneven_token_batches(tmp_path):
    # 509 examples of 1-12 symbols in batches of at most 300 tokens: batch counts and sizes vary by length. The
    # dataset is prepared first into a directory that stands in for a shared file system every node mounts. The
    # run directory is the default one rank 0 creates (runs/<date>/<time>): rank 1 must join it, not make its own.
    shared = tmp_path / "shared" / "reverse"
    _cli("prepare", *REVERSE, "data.n_train=509", f"prepared={shared}", "workers=2")
    _cli("train", *REVERSE, *DDP, "data.n_train=509", "loader.max_tokens=300", "trainer.max_epochs=2",
         f"prepared={shared}", cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "shared"]
    (run,) = (tmp_path / "runs").glob("*/*")
    assert not (run / "prepared").exists()
    assert json.loads((run / "data_report.json").read_text())["train"]["kept"] == 509
    assert sorted(p.name for p in run.glob("*.yaml")) == ["config.yaml"]
    assert {"val/exact_match", "test/exact_match"} <= set(json.loads((run / "metrics.json").read_text()))
    assert not list(run.glob("**/.hydra"))  # config.yaml is the one record of the config, written by rank 0


def test_two_ranks_train_like_one_process_with_the_same_global_batch(tmp_path):
    # One process with batches of 32 and two ranks with 16 each see the same 32 examples per step: rank r takes
    # every other batch of the same epoch order, and the loss is a mean over the global batch's target tokens.
    # In fp32: under bf16 autocast, half the rows per matmul may round differently, which is not what this tests.
    common = [*REVERSE, "data.n_train=256", "model.dropout=0.0", "trainer.max_steps=12", "trainer.max_epochs=-1",
              "monitor.patience=null", "trainer.precision=32-true"]
    _cli("train", *common, "loader.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}")
    _cli("train", *common, *DDP, "loader.batch_size=16", f"hydra.run.dir={tmp_path / 'two'}")
    (step_1, one), (step_2, two) = _state(tmp_path / "one"), _state(tmp_path / "two")
    assert step_1 == step_2 == 12
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-4, f"parameters differ by up to {worst} after 12 steps"  # float summation order only


@pytest.fixture(scope="module")
def half_trained_translation(tmp_path_factory):
    """A tiny translation model trained part of the way, so its BLEU is neither 0 nor 100."""
    tmp = tmp_path_factory.mktemp("ddp_bleu")
    pairs = pd.read_csv(EMBEDDED, sep="\t", dtype=str, keep_default_na=False)
    pairs = pairs[(pairs["split"] == "train") & (pairs["en"].str.len().between(10, 40))].head(37)
    pd.concat([pairs.assign(split=s) for s in ("train", "val", "test")]).to_csv(tmp / "tiny.tsv", sep="\t",
                                                                               index=False)
    config = compose([
        "experiment=translate_ko_en", f"data.path={tmp / 'tiny.tsv'}", "tokenizer.src.vocab_size=400",
        "tokenizer.src.min_frequency=1", "model=tiny", "model.dropout=0.0", "optim.schedule=constant",
        "optim.warmup_steps=40", "optim.lr=3e-3", "loader.batch_size=8", "loader.max_tokens=null",
        "trainer.max_epochs=25", "trainer.check_val_every_n_epoch=25", "monitor.patience=null",
        "trainer.enable_progress_bar=false"])
    train(config, tmp / "run")
    return tmp, tmp / "run" / "checkpoints" / "last.ckpt"


def test_corpus_bleu_is_identical_on_one_and_two_ranks(half_trained_translation):
    tmp, ckpt = half_trained_translation
    _cli("evaluate", f"ckpt={ckpt}", "batch_size=8", f"output={tmp / 'one'}")
    _cli("evaluate", f"ckpt={ckpt}", "batch_size=8", *DDP, f"output={tmp / 'two'}")
    one, two = (json.loads((tmp / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert 5 < one["val/bleu"] < 95, one  # a score that a dropped or repeated sentence would move
    for key in ("val/bleu", "val/chrf", "test/bleu", "test/chrf"):
        assert one[key] == two[key], (key, one[key], two[key])


def test_a_failing_rank_makes_the_launcher_exit_non_zero(tmp_path):
    (tmp_path / "rank_failure.py").write_text(textwrap.dedent("""
        import os
        from seq2seq.registry import DATASETS
        from seq2seq_plugins.synthetic import SyntheticTask

        @DATASETS.register("fails_on_rank_1")
        class FailsOnRank1(SyntheticTask):
            def files(self):  # every rank checks the data files before it maps the prepared data
                if os.environ.get("LOCAL_RANK") == "1":
                    raise RuntimeError("rank 1 cannot read its data")
                return super().files()
    """))
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path)}
    result = _cli("train", *REVERSE, *DDP, "data.name=fails_on_rank_1", "data.n_train=64",
                  "plugins=[seq2seq_plugins.synthetic,rank_failure]", f"hydra.run.dir={tmp_path / 'run'}",
                  env=env, ok=False)
    assert result.returncode != 0
    assert "rank 1 cannot read its data" in result.stderr


def test_multirun_with_a_relaunching_strategy_is_refused(tmp_path):
    result = _cli("train", "-m", *REVERSE, *DDP, "model.d_model=32,64", f"hydra.sweep.dir={tmp_path}", ok=False)
    assert "multirun" in result.stderr and "trainer=ddp_spawn" in result.stderr


def test_multirun_with_spawned_ranks_gives_each_job_its_own_run(tmp_path):
    spawn = ["trainer=ddp_spawn", *DDP[1:]]
    _cli("train", "-m", *REVERSE, *spawn, "data.n_train=128", "trainer.max_steps=2",
         "model.d_model=32,64", f"hydra.sweep.dir={tmp_path}")
    for job, width in (("0", 32), ("1", 64)):
        assert f"d_model: {width}" in (tmp_path / job / "config.yaml").read_text()
        assert (tmp_path / job / "metrics.json").is_file()
