"""Checkpoint averaging (`seq2seq average`, `average_last`) and EMA weights (`optim.ema_decay`)."""

import json

import pytest
import torch

from seq2seq import compose, train
from seq2seq.checkpoints import average_checkpoints
from seq2seq.errors import ConfigError
from seq2seq.inference import average, evaluate
from seq2seq.module import Seq2SeqModule
from seq2seq.schemas import AverageConfig, EvaluateConfig
from seq2seq.testing import build

BASE = ["experiment=reverse", "model=tiny", "model.dropout=0.1", "data.n_train=384", "data.n_val=32",
        "data.n_test=32", "loader.max_tokens=256", "trainer.max_epochs=-1", "monitor.patience=null",
        "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


@pytest.fixture(scope="module")
def module():
    return build(["experiment=reverse", "model=tiny"])[0]


def _save(module, state, path, step=0):
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": state, "global_step": step}, path)
    return path


def test_averaging_takes_the_mean_of_floating_tensors_and_the_last_of_the_others(module, tmp_path):
    names = list(module.state_dict())
    paths = []
    for k, value in enumerate([1.0, 2.0, 6.0]):
        state = {name: torch.full((2, 3), value) for name in names}
        state["count"] = torch.tensor([k, 10 * k])  # an integer buffer is not averaged
        paths.append(_save(module, state, tmp_path / f"{k}.ckpt", step=k))
    averaged = average_checkpoints(paths)
    for name in names:
        assert torch.equal(averaged["state_dict"][name], torch.full((2, 3), 3.0)), name
    assert torch.equal(averaged["state_dict"]["count"], torch.tensor([2, 20]))
    assert averaged["global_step"] == 2 and averaged["seq2seq"]["averaged"] == [str(p) for p in paths]
    assert "optimizer_states" not in averaged  # not resumable, by design


def test_seq2seq_average_writes_a_checkpoint_that_loads_with_the_mean_weights(module, tmp_path):
    states = [{n: t.clone() for n, t in module.state_dict().items()} for _ in range(2)]
    for t in states[1].values():
        if t.is_floating_point():
            t.add_(1.0)
    for k, state in enumerate(states):
        _save(module, state, tmp_path / f"step{k}.ckpt")
    out = average(AverageConfig(ckpts=[str(tmp_path / "step*.ckpt")], output=str(tmp_path / "avg.ckpt")))
    loaded = Seq2SeqModule.from_checkpoint(out)
    for name, weight in loaded.state_dict().items():
        if weight.is_floating_point():
            torch.testing.assert_close(weight, (states[0][name].double() + states[1][name].double()).div(2).float())


def test_average_refuses_fewer_than_two_and_checkpoints_of_other_models(module, tmp_path):
    one = _save(module, module.state_dict(), tmp_path / "one.ckpt")
    with pytest.raises(ConfigError, match=r"names 1 checkpoint\(s\); averaging needs two or more"):
        average(AverageConfig(ckpts=[str(one)], output=str(tmp_path / "x.ckpt")))
    with pytest.raises(ConfigError, match=r"no checkpoint matches .*nothing\*"):
        average(AverageConfig(ckpts=[str(tmp_path / "nothing*")], output=str(tmp_path / "x.ckpt")))
    other = build(["experiment=reverse", "model=tiny", "model.d_ff=32"])[0]
    two = _save(other, other.state_dict(), tmp_path / "two.ckpt")
    with pytest.raises(ConfigError, match=r"not checkpoints of one model \(their model configs differ\)"):
        average(AverageConfig(ckpts=[str(one), str(two)], output=str(tmp_path / "x.ckpt")))
    assert not (tmp_path / "x.ckpt").exists()


def test_average_last_scores_the_mean_of_the_last_validations_and_keeps_the_better(tmp_path):
    # 36 steps, validations every 6 batches of an epoch and at its end; the last 3 kept, with the final weights
    train(compose([*BASE, "trainer.max_steps=36", "trainer.val_check_interval=6", "average_last=3"]), tmp_path)
    checkpoints = tmp_path / "checkpoints"
    kept = sorted(checkpoints.glob("step*.ckpt"), key=lambda p: int(p.stem.removeprefix("step")))
    steps = [torch.load(p, weights_only=True)["global_step"] for p in kept]
    assert len(kept) == 3 and steps[-1] == 36 and [p.name for p in kept] == [f"step{s}.ckpt" for s in steps]
    averaged = torch.load(checkpoints / "averaged.ckpt", weights_only=True)["state_dict"]
    states = [torch.load(p, weights_only=True)["state_dict"] for p in kept]
    for name, weight in averaged.items():
        torch.testing.assert_close(weight, sum(s[name].double() for s in states).div(3).float())
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    candidates = metrics["candidates"]
    assert len(candidates) == 2 and "averaged.ckpt" in candidates
    chosen = max(candidates, key=lambda name: candidates[name]["val/exact_match"])
    if candidates["averaged.ckpt"]["val/exact_match"] == candidates[chosen]["val/exact_match"]:
        chosen = next(name for name in candidates if name != "averaged.ckpt")  # a tie keeps the best checkpoint
    assert metrics["best_checkpoint"].endswith(chosen)
    for name, scores in candidates.items():
        assert {"val/exact_match", "val/loss", "test/exact_match", "test/loss"} <= scores.keys(), name
    assert metrics["test/exact_match"] == candidates[chosen]["test/exact_match"]


def test_with_ema_and_average_last_each_candidate_is_scored_with_its_own_weights_and_none_is_resumed(tmp_path):
    config = [*BASE, "trainer.val_check_interval=6", "average_last=3", "optim.ema_decay=0.8"]
    train(compose([*config, "trainer.max_steps=36"]), tmp_path)
    candidates = json.loads((tmp_path / "metrics.json").read_text())["candidates"]
    assert len(candidates) == 3 and {"averaged.ckpt", "trained.ckpt"} < candidates.keys()
    for name, scores in candidates.items():  # as scored after training, and by the checkpoint loaded alone
        scored = evaluate(EvaluateConfig(ckpt=str(tmp_path / "checkpoints" / name)))
        assert scored["val/loss"] == pytest.approx(scores["val/loss"], abs=1e-6), name
        assert scored["test/loss"] == pytest.approx(scores["test/loss"], abs=1e-6), name
    assert len({scores["val/loss"] for scores in candidates.values()}) == 3
    # the derived checkpoints are the newest, but they hold no training state: resuming takes last.ckpt
    train(compose([*config, "trainer.max_steps=40", f"resume={tmp_path}"]), tmp_path)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 40


def _record_weights(monkeypatch) -> list[dict[str, torch.Tensor]]:
    seen = []

    def on_train_batch_end(self, *args):
        seen.append({name: p.detach().clone() for name, p in self.named_parameters()})

    monkeypatch.setattr(Seq2SeqModule, "on_train_batch_end", on_train_batch_end, raising=False)
    return seen


@pytest.mark.parametrize("warmup", [10, 20, None])
def test_ema_weights_follow_the_update_rule_and_checkpoints_hold_them(tmp_path, monkeypatch, warmup):
    seen = _record_weights(monkeypatch)
    ramp = "null" if warmup is None else warmup
    train(compose([*BASE, "trainer.max_steps=5", "optim.ema_decay=0.5", f"optim.ema_warmup={ramp}",
                   "save_every_n_steps=1"]), tmp_path)
    assert len(seen) == 5
    ema = dict(seen[0])  # the first update copies the weights
    for n, weights in enumerate(seen[1:], 1):
        d = 0.5 if warmup is None else min(0.5, (1 + n) / (warmup + n))  # warm-up 10: 0.18, 0.25, 0.31, 0.36
        ema = {name: d * ema[name] + (1 - d) * weights[name] for name in ema}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 5
    for name, value in ema.items():
        torch.testing.assert_close(ckpt["state_dict"][name], value, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(ckpt["current_model_state"][name], seen[-1][name]), name  # training goes on from these
    gap = ckpt["state_dict"]["model.encoder.0.ff.w1.weight"] - seen[-1]["model.encoder.0.ff.w1.weight"]
    assert gap.abs().max() > 1e-6  # the average is not the last weights, by more than rounding


@pytest.mark.slow  # trains, validates each candidate
def test_ema_and_the_trained_weights_beside_it_compete_on_validation(tmp_path):
    # a validation at the end of each 13-batch epoch; the best checkpoint holds the EMA, trained.ckpt the weights
    # trained beside it; the better on validation is kept (a tie keeps the EMA)
    module = train(compose([*BASE, "trainer.max_steps=26", "optim.ema_decay=0.8"]), tmp_path)
    metrics, checkpoints = json.loads((tmp_path / "metrics.json").read_text()), tmp_path / "checkpoints"
    candidates = metrics["candidates"]
    assert len(candidates) == 2 and "trained.ckpt" in candidates
    ema_name = next(name for name in candidates if name != "trained.ckpt")
    ema, trained = (torch.load(checkpoints / name, weights_only=True) for name in (ema_name, "trained.ckpt"))
    for name, weight in ema["current_model_state"].items():
        assert torch.equal(trained["state_dict"][name], weight), name
    assert max((ema["state_dict"][n] - w).abs().max() for n, w in ema["current_model_state"].items()) > 1e-6
    better = candidates["trained.ckpt"]["val/exact_match"] > candidates[ema_name]["val/exact_match"]
    assert metrics["best_checkpoint"].endswith("trained.ckpt" if better else ema_name)
    kept = torch.load(metrics["best_checkpoint"], weights_only=True)["state_dict"]
    for name, weight in module.state_dict().items():  # the module left for the report holds the kept weights
        assert torch.equal(weight, kept[name]), name
    for name, scores in candidates.items():  # each checkpoint, loaded alone, gives the scores on record
        scored = evaluate(EvaluateConfig(ckpt=str(checkpoints / name)))
        assert scored["test/loss"] == pytest.approx(scores["test/loss"], abs=1e-6), name
        assert scored["val/loss"] == pytest.approx(scores["val/loss"], abs=1e-6), name
    # two sets of weights scored, not one twice: their losses differ by more than float noise
    assert abs(candidates["trained.ckpt"]["val/loss"] - candidates[ema_name]["val/loss"]) > 1e-4


@pytest.mark.slow  # trains twice
def test_ema_training_resumes_exactly(tmp_path):
    config = [*BASE, "optim.ema_decay=0.9", "save_every_n_steps=1"]
    train(compose([*config, "trainer.max_steps=20"]), tmp_path / "straight")
    train(compose([*config, "trainer.max_steps=11"]), tmp_path / "resumed")
    train(compose([*config, "trainer.max_steps=20", f"resume={tmp_path / 'resumed'}"]), tmp_path / "resumed")
    want, got = (torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
                 for run in ("straight", "resumed"))
    assert got["global_step"] == want["global_step"] == 20
    for key in ("state_dict", "current_model_state"):
        for name, value in want[key].items():
            assert torch.equal(got[key][name], value), (key, name)
