"""Exact resume: stop a run at any step, resume it, and land on the same parameters as a run that never stopped."""

import errno
import json
import os
import signal
import time

import pytest
import torch

from seq2seq import budget, compose, train
from seq2seq.checkpoints import AtomicCheckpointIO
from seq2seq.errors import ConfigError, StorageError
from seq2seq.module import Seq2SeqModule
from seq2seq.runs import RunDir

# Dropout on, shuffled token-budget batches, 12 batches per epoch: step 17 stops mid-epoch 2 of 3.
BASE = ["experiment=reverse", "model=tiny", "model.dropout=0.1", "data.n_train=384", "data.n_val=32",
        "data.n_test=32", "loader.max_tokens=256", "trainer.max_epochs=-1", "monitor.patience=null",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "save_every_n_steps=1"]


def _final(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["global_step"], ckpt["state_dict"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train(compose([*BASE, "trainer.max_steps=30"]), run_dir)
    return _final(run_dir)


def epoch_loops(path):
    return torch.load(path, weights_only=True)["loops"]["fit_loop"]["epoch_progress"]


def _interrupt_mid_step(monkeypatch, step):
    """Ctrl-C inside training step `step`, after its forward pass has drawn its dropout masks."""
    forward = Seq2SeqModule.training_step

    def training_step(self, batch, batch_idx):
        loss = forward(self, batch, batch_idx)
        if self.global_step == step:
            raise KeyboardInterrupt
        return loss

    monkeypatch.setattr(Seq2SeqModule, "training_step", training_step)


@pytest.mark.parametrize("stop", ["max_steps", "max_steps_in_the_first_epoch", "ctrl_c"])
def test_stop_and_resume_lands_on_the_same_parameters(straight, tmp_path, monkeypatch, caplog, stop):
    if stop == "max_steps":
        train(compose([*BASE, "trainer.max_steps=17"]), tmp_path)
    elif stop == "max_steps_in_the_first_epoch":
        # No validation before the stop: the newest checkpoints are written after training has stopped (the final
        # weights, validated then), when Lightning counts the epoch as done; they must resume inside it.
        train(compose([*BASE, "trainer.max_steps=7"]), tmp_path)
        assert epoch_loops(RunDir(tmp_path).newest_checkpoint())["current"]["processed"] == 0
    else:
        _interrupt_mid_step(monkeypatch, 11)
        with pytest.raises(SystemExit):  # Lightning saves interrupted.ckpt, then exits 1
            train(compose([*BASE, "trainer.max_steps=30"]), tmp_path)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Lightning ignores further Ctrl-C
        monkeypatch.undo()
        assert RunDir(tmp_path).newest_checkpoint().name == "interrupted.ckpt"
        assert f"interrupted.ckpt. Continue with the same command and `resume={tmp_path}`" in caplog.text
    (tmp_path / "checkpoints" / "last.ckpt.partial").write_bytes(b"cut short")
    train(compose([*BASE, "trainer.max_steps=30", f"resume={tmp_path}"]), tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "last.ckpt" in names and not [n for n in names if "-v1" in n or n.endswith(".partial")], names
    (step_a, a), (step_b, b) = straight, _final(tmp_path)
    assert step_a == step_b == 30
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_resume_refuses_a_different_config_and_a_new_run_refuses_a_used_directory(tmp_path):
    train(compose([*BASE, "trainer.max_steps=2", "trainer.limit_val_batches=0"]), tmp_path)
    before = (tmp_path / "config.yaml").read_text(), (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    with pytest.raises(ConfigError, match=r"already holds a run\. Continue it with `resume=.*`hydra\.run\.dir=\.\.\.`"):
        train(compose([*BASE, "model.d_model=64"]), tmp_path)
    assert before == ((tmp_path / "config.yaml").read_text(), (tmp_path / "checkpoints" / "last.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="differs in model"):
        train(compose([*BASE, "model.d_model=128", f"resume={tmp_path}"]), tmp_path)
    with pytest.raises(ConfigError, match="must be the run directory"):
        train(compose([*BASE, f"resume={tmp_path / 'elsewhere'}"]), tmp_path)
    with pytest.raises(ConfigError, match="no run there to resume"):
        train(compose([*BASE, f"resume={tmp_path / 'empty'}"]), tmp_path / "empty")


def test_an_interrupted_write_leaves_the_previous_checkpoint_whole(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(2), "big": torch.zeros(1000), "bad": Unpicklable()}, path)
    assert io.load_checkpoint(path)["step"] == 1
    assert path.with_name("last.ckpt.partial").exists()  # the cut-short write, never named *.ckpt
    assert RunDir(tmp_path).newest_checkpoint() == path


def test_a_full_disk_names_the_checkpoint_and_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def full(obj, f):
        f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(StorageError, match=r"cannot write the checkpoint .*last.ckpt: No space left on device "
                                           r"\([\d,]+ MiB free there\); the checkpoint there before is intact"):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert io.load_checkpoint(path)["step"] == 1 and sorted(os.listdir(path.parent)) == ["last.ckpt"]


def test_resume_picks_the_newest_checkpoint(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for i, name in enumerate(["best-step10.ckpt", "interrupted.ckpt", "last.ckpt"]):
        (folder / name).write_bytes(b"x")
        os.utime(folder / name, ns=(time.time_ns(), time.time_ns() + [2, 3, 1][i] * 10**9))
    assert RunDir(tmp_path).newest_checkpoint().name == "interrupted.ckpt"
    with pytest.raises(ConfigError, match="no checkpoint"):
        RunDir(tmp_path / "nothing").newest_checkpoint()


def test_a_resume_clears_a_cut_short_sharded_save_and_restores_the_checkpoint_it_had_moved_aside(tmp_path):
    # A sharded save writes last.ckpt.partial/, moves last.ckpt/ aside, renames the new one in: killed between the
    # renames, the complete old checkpoint waits aside and must come back (the partial one may be unfinished).
    run, config = RunDir(tmp_path), {"resume": str(tmp_path), "optim": {"total_steps": 10}, "seed": 0}
    run.write_config(config)
    (run.checkpoints / "last.ckpt.partial").mkdir(parents=True)
    (run.checkpoints / "last.ckpt.old-41").mkdir()
    (run.checkpoints / "last.ckpt.old-41" / "meta.pt").write_bytes(b"old")
    (run.checkpoints / "best-step4.ckpt.old-41").write_bytes(b"stale")  # its checkpoint is in place: it goes
    (run.checkpoints / "best-step4.ckpt").write_bytes(b"x")
    os.utime(run.checkpoints / "best-step4.ckpt", ns=(0, 0))
    assert run.resume_point(config) == run.checkpoints / "last.ckpt"
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["best-step4.ckpt", "last.ckpt"]
    assert (run.checkpoints / "last.ckpt" / "meta.pt").read_bytes() == b"old"


BUDGET = [*BASE, "trainer.max_time=00:01:00:00", "optim.schedule=linear", "optim.warmup_fraction=0.2",
          "optim.lr=1e-3"]


def test_a_time_budget_plans_the_steps_and_a_resumed_run_keeps_the_plan(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "plan_steps", lambda costs: (40, 0.0))  # what the measured pace would allow
    straight = tmp_path / "straight"
    train(compose(BUDGET), straight)
    assert json.loads((straight / "plan.json").read_text())["total_steps"] == 40
    assert json.loads((straight / "plan.json").read_text())["warmup_steps"] == 8  # a fifth of the plan
    assert "total_steps: 40" in (straight / "config.yaml").read_text()  # `optim.total_steps=40` reproduces it
    run = tmp_path / "run"
    elapsed = []
    monkeypatch.setattr(budget, "plan_steps", lambda costs: elapsed.append(costs.elapsed) or (40, 0.0))
    _interrupt_mid_step(monkeypatch, 26)  # after the decision (step 25)
    with pytest.raises(SystemExit):
        train(compose(BUDGET), run)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    monkeypatch.undo()
    # a new decision (at step 36) would differ, and the budget spent before the stop still counts
    monkeypatch.setattr(budget, "plan_steps", lambda costs: elapsed.append(costs.elapsed) or (99, 0.0))
    train(compose([*BUDGET, f"resume={run}"]), run)
    (step_a, a), (step_b, b) = _final(straight), _final(run)
    assert step_a == step_b == 40
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert len(elapsed) == 2 and elapsed[1] > elapsed[0]


def test_an_explicit_total_fixes_the_plan_without_measuring(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "plan_steps", lambda costs: pytest.fail("a total was given: nothing to measure"))
    train(compose([*BUDGET, "optim.total_steps=12"]), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and not (tmp_path / "plan.json").exists()
    schedule = last["lr_schedulers"][0]["lr_lambdas"][0]
    assert (schedule["total"], schedule["warmup"]) == (12, 2)
    assert last["lr_schedulers"][0]["_last_lr"] == [0.0]  # decayed to zero at the end it was given


def test_a_run_that_falls_behind_its_plan_plans_fewer_steps(tmp_path, monkeypatch, caplog):
    # planned at step 25; at step 35 more would fit, not taken (the linear decay has begun: its rate would jump);
    # at step 45 fewer do
    decisions = iter([(60, 0.0), (70, 0.0), (50, 0.0)])
    monkeypatch.setattr(budget, "plan_steps", lambda costs: next(decisions, (50, 0.0)))
    with caplog.at_level("DEBUG", logger="seq2seq"):
        train(compose(BUDGET), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 50 and last["lr_schedulers"][0]["lr_lambdas"][0]["total"] == 50
    assert json.loads((tmp_path / "plan.json").read_text())["total_steps"] == 50
    assert "50 steps planned instead of 60, so that the run ends in time" in caplog.text
    assert "training ended at step 50 of 50 planned" in caplog.text and "the plan changed 1 time as" in caplog.text
    assert "70 steps planned" not in caplog.text  # never taken


def test_a_run_ahead_of_its_plan_plans_more_steps_while_its_rate_allows(tmp_path, monkeypatch):
    # wsd over 60 steps cools down from step 48; the plan grows to 80 at step 35 (cooldown from step 64), and at
    # step 65 no more: the cooldown has begun
    decisions = {25: 60, 35: 80, 65: 100}
    seen = []

    def plan(costs):
        seen.append(costs.done)
        return decisions.get(costs.done, 80), 0.0

    monkeypatch.setattr(budget, "plan_steps", plan)
    train(compose([*BUDGET, "optim.schedule=wsd"]), tmp_path)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 80 and last["lr_schedulers"][0]["lr_lambdas"][0]["total"] == 80
    assert last["lr_schedulers"][0]["_last_lr"] == [0.0]  # cooled down to zero at the end it grew to
    assert seen == [25, 35, 45, 55, 65, 75]
    assert json.loads((tmp_path / "plan.json").read_text())["total_steps"] == 80


@pytest.mark.parametrize(("every", "probes"), [(100, [35, 45]), (1, [])])  # validations: never; each 12 steps
def test_scoring_costs_are_measured_again_as_training_goes(tmp_path, monkeypatch, every, probes):
    # with no validation inside the run, the sanity check's batch is validated again at half and three quarters of
    # the planned 60 steps (the checks at steps 35 and 45), and the plan uses what it cost; validations every
    # epoch (13 steps) measure it before those points, and better
    seen = []

    def plan(costs):
        seen.append((costs.done, costs.val_batch))
        return 60, 0.0

    monkeypatch.setattr(budget, "plan_steps", plan)
    decoded = []
    probe = budget.BudgetPlanner._validate_again
    monkeypatch.setattr(budget.BudgetPlanner, "_validate_again",
                        lambda self, trainer, module: decoded.append(trainer.global_step) or probe(self, trainer,
                                                                                                   module))
    train(compose([*BUDGET, f"trainer.check_val_every_n_epoch={every}"]), tmp_path)
    assert decoded == probes
    steps, costs = zip(*seen, strict=True)
    assert steps == (25, 35, 45, 55)
    assert costs[0] > 0
    if every == 100:  # each probe a new measurement
        assert costs[0] != costs[1] != costs[2] == costs[3]
    else:  # each validation (at steps 13, 26, 39, 52) a new measurement
        assert costs[0] != costs[1] != costs[2] != costs[3]


def test_a_plan_never_goes_past_the_runs_step_bound(tmp_path, monkeypatch):
    monkeypatch.setattr(budget, "plan_steps", lambda costs: (60, 0.0))  # the time would allow more
    train(compose([*BUDGET, "trainer.max_steps=30"]), tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 30
    assert json.loads((tmp_path / "plan.json").read_text())["total_steps"] == 30
