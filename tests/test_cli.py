"""End to end through the real Lightning Trainer and Hydra app."""

import json
import re
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import cli as run_cli

from seq2seq import Translator, cli, compose, train
from seq2seq.errors import ConfigError, DivergedError
from seq2seq.module import Seq2SeqModule
from seq2seq.runs import RunDir
from seq2seq_plugins.synthetic import SyntheticTask


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = run_cli(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_writes_the_run_directory_and_logs_progress_lines_without_a_terminal(tmp_path):
    result = _cli("train", "experiment=copy", "data.n_train=256", "data.n_val=64", "data.n_test=64",
                  "trainer.max_epochs=1", "trainer.log_every_n_steps=2", f"hydra.run.dir={tmp_path}")
    assert "step 4, epoch 0, train/loss" in result.stderr  # stderr is a pipe here: log lines, no bar
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/exact_match", "val/loss", "test/exact_match", "best_checkpoint"} <= set(metrics)
    assert Path(metrics["best_checkpoint"]).parent == tmp_path / "checkpoints"
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert "train/loss" in (tmp_path / "logs" / "metrics.csv").read_text()
    assert "task: copy" in (tmp_path / "config.yaml").read_text()
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["train"] == {"lines_read": 256, "examples_read": 256, "kept": 256, "rejected": {}, "files": {}}
    ckpt = torch.load(metrics["best_checkpoint"], weights_only=True)  # plain data only
    assert ckpt["hyper_parameters"]["config"]["data"]["task"] == "copy"
    assert ckpt["seq2seq"]["plugins"] == {"seq2seq_plugins.synthetic": f"seq2seq {ckpt['seq2seq']['version']}"}


def test_bf16_mixed_precision_trains_on_the_cpu_under_autocast(tmp_path, monkeypatch):
    seen = []
    step = Seq2SeqModule.training_step

    def training_step(self, batch, batch_idx):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return step(self, batch, batch_idx)

    monkeypatch.setattr(Seq2SeqModule, "training_step", training_step)
    config = compose(["experiment=copy", "trainer.precision=bf16-mixed", "trainer.max_epochs=1", "data.n_train=256",
                      "data.n_val=32", "data.n_test=32", "trainer.enable_progress_bar=false"])
    train(config, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert seen and all(seen)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))


def test_max_steps_that_ends_mid_epoch_with_early_stopping_finishes_the_run(tmp_path):
    config = compose(["experiment=copy", "trainer.max_steps=3", "monitor.patience=2", "data.n_train=512",
                      "data.n_val=32", "data.n_test=32", "trainer.enable_progress_bar=false"])
    train(config, tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/exact_match", "test/exact_match"} <= set(metrics)
    assert metrics["best_checkpoint"].endswith("best-step3.ckpt")


@pytest.mark.parametrize(("args", "message"), [
    (["train", "experiment=nope"], "unknown experiment `nope`. Available: copy,"),
    (["train", "experiment=reverse", "model.d_model=0"], "`model.d_model` must be at least 1, got 0"),
    (["train", "experiment=translate_ko_en", "data.path=missing.tsv"], "missing.tsv: no such file"),
    (["translate", "ckpt=truncated.ckpt"], "`ckpt=truncated.ckpt` is not a readable checkpoint"),
    # found in the data, after preparing it but before training: no interrupted.ckpt, no run directory left
    (["train", "experiment=reverse", "loader.max_tokens=1", "data.n_train=64", "data.n_val=8", "data.n_test=8"],
     "`loader.max_tokens` (1) is below the longest example"),
])
def test_mistakes_exit_2_with_one_line_and_leave_no_run_directory(args, message, tmp_path):
    (tmp_path / "truncated.ckpt").write_bytes(b"PK\x03\x04 cut short")
    result = run_cli(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_a_used_run_directory_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 7\n")
    result = run_cli("train", "experiment=reverse", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert f"resume={tmp_path}" in result.stderr and "hydra.run.dir=" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_runs_started_in_the_same_second_get_a_directory_each(tmp_path):
    now = datetime(2026, 12, 3, 18, 52, 27)
    with ThreadPoolExecutor(8) as pool:
        claimed = list(pool.map(lambda _: RunDir.claim(tmp_path / "runs", now).path, range(8)))
    names = sorted(p.name for p in claimed)
    assert names == sorted(["18-52-27", *(f"18-52-27-{n}" for n in range(2, 9))])
    assert all(p.parent == tmp_path / "runs" / "2026-12-03" and p.is_dir() for p in claimed)


def test_the_command_line_claims_a_new_run_directory_and_names_it_for_hydra(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 3, 18, 52, 27)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "datetime", Frozen)
    first, second = (cli._hydra_argv("train", ["experiment=reverse"]) for _ in range(2))
    assert first[1].path == Path("runs/2026-12-03/18-52-27") and second[1].path == Path("runs/2026-12-03/18-52-27-2")
    assert all(f"hydra.run.dir={run.path}" in argv and run.path.is_dir() for argv, run in (first, second))
    named = cli._hydra_argv("train", ["experiment=reverse", f"hydra.run.dir={tmp_path / 'mine'}"])
    assert named[1] is None and sum(a.startswith("hydra.run.dir=") for a in named[0]) == 1


def test_a_run_that_hydra_refuses_leaves_no_run_directory(tmp_path):
    result = run_cli("train", "experiment=reverse", "hydra.job.nope=1", cwd=tmp_path)
    assert result.returncode != 0 and "nope" in result.stderr
    assert not (tmp_path / "runs").exists()


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
    fresh = subprocess.run([sys.executable, "-m", "seq2seq", "predict", f"ckpt={metrics['best_checkpoint']}",
                            f"input={tmp_path / 'in.txt'}", f"output={tmp_path / 'out.txt'}"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert (tmp_path / "out.txt").read_text().splitlines() == Translator(module).translate(sources)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_evaluate_rescoring_a_checkpoint_reproduces_its_metrics(reverse_run, tmp_path):
    _, _, metrics = reverse_run
    result = _cli("evaluate", f"ckpt={metrics['best_checkpoint']}", "trainer.enable_progress_bar=false",
                  f"output={tmp_path}")
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert json.loads(result.stdout) == again
    for key in ("val/exact_match", "test/exact_match", "val/loss"):
        assert again[key] == pytest.approx(metrics[key], abs=1e-6)


@pytest.mark.slow
def test_evaluate_scores_other_data_with_the_checkpoints_reader_or_refuses_clearly(reverse_run):
    from seq2seq.inference import evaluate

    _, _, metrics = reverse_run
    ckpt = f"ckpt={metrics['best_checkpoint']}"
    longer = evaluate(compose([ckpt, "data.min_len=13", "data.max_len=16"], command="evaluate"))
    assert longer["val/exact_match"] < metrics["val/exact_match"] - 0.2  # longer than anything it trained on
    with pytest.raises(ConfigError, match=r"unknown option `data\.path` for dataset `synthetic`"):
        evaluate(compose([ckpt, "data.path=other.tsv"], command="evaluate"))


@pytest.mark.parametrize(("max_steps", "lr"), [(8, 1.0), (6, 1.0), (12, 0.0)])  # an epoch is 8 steps
def test_final_scoring_decodes_the_validation_split_once_per_set_of_weights(max_steps, lr, tmp_path, monkeypatch):
    runs = []
    end = Seq2SeqModule.on_validation_epoch_end

    def counted(self):
        runs.append(self.global_step)
        end(self)

    monkeypatch.setattr(Seq2SeqModule, "on_validation_epoch_end", counted)
    config = compose(["experiment=copy", f"trainer.max_steps={max_steps}", "data.n_train=512", "data.n_val=32",
                      "data.n_test=32", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
                      f"optim.lr={lr}"])
    train(config, tmp_path)
    # 8 steps: the epoch's validation scores the final weights, and final scoring reuses them. 6 steps: no
    # validation during training; the final weights are validated once, and those scores are the result. 12 steps
    # at a rate of 0: the final weights are validated and do not beat step 8's, whose scores are known already.
    assert runs == sorted({min(8, max_steps), max_steps})
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert {"val/exact_match", "test/exact_match"} <= set(metrics)
    assert metrics["best_checkpoint"].endswith(f"best-step{min(8, max_steps)}.ckpt")


def test_a_refused_resume_leaves_the_run_it_names_untouched(tmp_path):
    (tmp_path / "config.yaml").write_text("seed: 7\n")  # a run directory whose checkpoints are gone
    (tmp_path / "logs").mkdir()
    result = run_cli("train", "experiment=reverse", f"resume={tmp_path}")
    assert result.returncode == 2 and "differs in" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "logs"]


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_checkpoints_before_it(tmp_path):
    config = compose(["experiment=copy", "optim.lr=1e15", "save_every_n_steps=1", "data.n_train=256",
                      "data.n_val=32", "data.n_test=32", "trainer.enable_progress_bar=false"])
    with pytest.raises(DivergedError, match=r"training diverged: the loss is not finite at step (\d+)") as caught:
        train(config, tmp_path)
    step = int(re.search(r"at step (\d+)", str(caught.value)).group(1))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]  # no interrupted.ckpt
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == step - 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow  # a Python start
def test_ctrl_c_saves_interrupted_ckpt_and_exits_130(tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", "from seq2seq.cli import main; main()", "train", "experiment=copy",
                             "data.n_train=100000", "trainer.log_every_n_steps=1", f"hydra.run.dir={run}"],
                            stderr=subprocess.PIPE, text=True,  # Ctrl-C's default, even where the suite
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # runs with it ignored
    for line in proc.stderr:
        if "step 2," in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert (run / "checkpoints" / "interrupted.ckpt").is_file() and "Tip:" not in err
