"""Several processes on the CPU (2 gloo ranks, Lightning's launcher re-running the command line): DDP, and FSDP2
(`trainer=fsdp`) where it must behave as DDP does."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from seq2seq import compose, train
from seq2seq.checkpoints import read_checkpoint
from seq2seq_plugins.text import EMBEDDED

pytestmark = pytest.mark.slow
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
FSDP = ["trainer=fsdp", *DDP[1:]]
REVERSE = ["experiment=reverse", "data.n_val=64", "data.n_test=64", "trainer.log_every_n_steps=1"]


def _cli(*args: str, env: dict | None = None, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "seq2seq", *args], capture_output=True, text=True, timeout=300,
                            env=env, cwd=cwd)
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def _state(run_dir):
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")  # a file, or a folder of shards
    return ckpt["global_step"], ckpt["state_dict"]


def _losses(run_dir) -> list[float]:
    return pd.read_csv(run_dir / "logs" / "metrics.csv").dropna(subset=["train/loss"])["train/loss"].tolist()


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


def test_two_ranks_train_like_one_process_with_the_same_global_batch_under_ddp_and_fsdp(tmp_path):
    # One process with batches of 32 and two ranks with 16 each see the same 32 examples per step: rank r takes
    # every other batch of the same epoch order, and the loss is a mean over the global batch's target tokens.
    # FSDP2 shards every layer's weights, gradients and AdamW states over the two ranks and must train as DDP
    # does. In fp32: under bf16 autocast, half the rows per matmul may round differently, which is not what this
    # tests.
    common = [*REVERSE, "data.n_train=256", "model.dropout=0.0", "trainer.max_steps=12", "trainer.max_epochs=-1",
              "monitor.patience=null", "trainer.precision=32-true"]
    _cli("train", *common, "loader.batch_size=32", f"hydra.run.dir={tmp_path / 'one'}")
    _cli("train", *common, *DDP, "loader.batch_size=16", f"hydra.run.dir={tmp_path / 'ddp'}")
    _cli("train", *common, *FSDP, "loader.batch_size=16", f"hydra.run.dir={tmp_path / 'fsdp'}")
    (step_1, one), (step_d, ddp), (step_f, fsdp) = (_state(tmp_path / name) for name in ("one", "ddp", "fsdp"))
    assert step_1 == step_d == step_f == 12
    assert len(list((tmp_path / "fsdp" / "checkpoints" / "last.ckpt").glob("*.distcp"))) == 2  # one shard a rank
    for name, weights in (("ddp", ddp), ("fsdp", fsdp)):  # float summation order only
        worst = max(float((one[k] - weights[k]).abs().max()) for k in one)
        assert worst < 1e-4, f"{name}: parameters differ from one process's by up to {worst} after 12 steps"
    worst = max(float((ddp[k] - fsdp[k]).abs().max()) for k in ddp)
    assert worst < 1e-4, f"fsdp: parameters differ from ddp's by up to {worst} after 12 steps"
    ddp_losses, fsdp_losses = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")  # rank 0's, step by step
    assert len(ddp_losses) == 12 and fsdp_losses == pytest.approx(ddp_losses, abs=1e-5)


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


def test_corpus_scores_are_identical_on_one_and_two_ranks_whose_sentences_differ_in_length(half_trained_translation):
    # 37 sentences in batches of 8, dealt in turn: rank 0 decodes batches 0, 2, 4 and rank 1 batches 1, 3. The
    # file puts the 21 longest sentences in rank 0's batches and the 16 shortest in rank 1's, so rank 1 finishes
    # decoding well before rank 0; under FSDP2 neither may wait for the other in a collective while decoding.
    tmp, ckpt = half_trained_translation
    pairs = pd.read_csv(tmp / "tiny.tsv", sep="\t", dtype=str, keep_default_na=False)
    held = pairs[pairs["split"] == "train"].assign(n=lambda f: f["en"].str.len()).sort_values("n", ascending=False)
    order = [*range(0, 8), *range(21, 29), *range(8, 16), *range(29, 37), *range(16, 21)]  # batch by batch
    skewed = held.iloc[order].drop(columns="n")
    pd.concat([pairs[pairs["split"] == "train"], *(skewed.assign(split=s) for s in ("val", "test"))]).to_csv(
        tmp / "skewed.tsv", sep="\t", index=False)
    data = f"data.path={tmp / 'skewed.tsv'}"
    _cli("evaluate", f"ckpt={ckpt}", data, "batch_size=8", f"output={tmp / 'one'}")
    _cli("evaluate", f"ckpt={ckpt}", data, "batch_size=8", *DDP, f"output={tmp / 'ddp'}")
    _cli("evaluate", f"ckpt={ckpt}", data, "batch_size=8", *FSDP, f"output={tmp / 'fsdp'}")
    one, ddp, fsdp = (json.loads((tmp / d / "metrics.json").read_text()) for d in ("one", "ddp", "fsdp"))
    assert 5 < one["val/bleu"] < 95, one  # a score that a dropped or repeated sentence would move
    for key in ("val/bleu", "val/chrf", "test/bleu", "test/chrf"):
        assert one[key] == ddp[key] == fsdp[key], (key, one[key], ddp[key], fsdp[key])
    for key in ("val/loss", "test/loss"):  # per target token, summed over ranks
        assert ddp[key] == pytest.approx(one[key], abs=1e-5) and fsdp[key] == pytest.approx(one[key], abs=1e-5)


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
