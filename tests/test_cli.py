"""End to end through the real Lightning Trainer and Hydra app."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq import compose, train
from seq2seq_plugins.synthetic import SyntheticTask


def _cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", "from seq2seq.cli import main; main()", *args],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_writes_the_run_directory(tmp_path):
    _cli("train", "experiment=copy", "data.n_train=256", "data.n_val=64", "data.n_test=64", "trainer.max_epochs=1",
         "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/exact_match", "val/loss", "test/exact_match", "best_checkpoint"} <= set(metrics)
    assert Path(metrics["best_checkpoint"]).parent == tmp_path / "checkpoints"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "train/loss" in (tmp_path / "logs" / "metrics.csv").read_text()
    assert "task: copy" in (tmp_path / "config.yaml").read_text()
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"] == {"rows_read": 256, "kept": 256, "rejected": {}}
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True)  # plain data only
    assert ckpt["hyper_parameters"]["config"]["data"]["task"] == "copy"
    assert ckpt["seq2seq"]["plugins"] == {"seq2seq_plugins.synthetic": f"seq2seq {ckpt['seq2seq']['version']}"}


def test_bf16_mixed_precision_trains_on_the_cpu(tmp_path):
    config = compose(["experiment=copy", "trainer.precision=bf16-mixed", "trainer.max_epochs=1", "data.n_train=256",
                      "data.n_val=32", "data.n_test=32", "trainer.enable_progress_bar=false"])
    train(config, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


@pytest.fixture(scope="module")
def reverse_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("reverse")
    module = train(compose(["experiment=reverse", "trainer.enable_progress_bar=false"]), run_dir)
    return run_dir, module, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_reverse_must_learn_to_99_percent_exact_match(reverse_run):
    _, _, metrics = reverse_run
    assert metrics["val/exact_match"] >= 0.99
    assert metrics["test/exact_match"] >= 0.97


@pytest.mark.slow
def test_a_checkpoint_reloaded_in_a_fresh_process_decodes_identically(reverse_run, tmp_path):
    _, module, metrics = reverse_run
    sources = [src for src, _ in SyntheticTask(seed=11, n_test=100).read("test").pairs]
    (tmp_path / "in.txt").write_text("\n".join(sources) + "\n")
    _cli("predict", f"ckpt={metrics['best_checkpoint']}", f"input={tmp_path / 'in.txt'}",
         f"output={tmp_path / 'out.txt'}", f"hydra.run.dir={tmp_path / 'run'}")
    assert (tmp_path / "out.txt").read_text().splitlines() == module.predict(sources)


@pytest.mark.slow
def test_evaluate_rescoring_a_checkpoint_reproduces_its_metrics(reverse_run, tmp_path):
    _, _, metrics = reverse_run
    _cli("evaluate", f"ckpt={metrics['best_checkpoint']}", "trainer.enable_progress_bar=false",
         f"hydra.run.dir={tmp_path}")
    again = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("val/exact_match", "test/exact_match", "val/loss"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)
