"""Hydra multirun sweeps, and the Optuna preset that optimizes the monitored metric."""

import json
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow
QUICK = ["experiment=reverse", "data.n_train=512", "data.n_val=64", "data.n_test=64", "trainer.max_epochs=2",
         "trainer.enable_progress_bar=false"]


def _multirun(*args: str) -> None:
    result = subprocess.run([sys.executable, "-m", "seq2seq", "train", "-m", *QUICK, *args], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_grid_sweep_runs_one_job_per_value(tmp_path):
    _multirun("model.d_model=32,64", f"hydra.sweep.dir={tmp_path}")
    widths = sorted(yaml.safe_load((job / "config.yaml").read_text())["model"]["d_model"]
                    for job in tmp_path.iterdir() if job.is_dir())
    assert widths == [32, 64]
    assert all((tmp_path / job / "metrics.json").is_file() for job in ("0", "1"))


def test_the_optuna_preset_maximizes_the_monitored_metric_over_two_trials(tmp_path):
    _multirun("sweep=optuna", "hydra.sweeper.n_trials=2", "model.d_model=choice(32,64)", "optim.lr=interval(0.5,2)",
              f"hydra.sweep.dir={tmp_path}")
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    scores = [json.loads((tmp_path / job / "metrics.json").read_text())["val/exact_match"] for job in ("0", "1")]
    assert result["best_value"] == pytest.approx(max(scores))  # maximized: `monitor.mode` is max
    assert set(result["best_params"]) == {"model.d_model", "optim.lr"}
