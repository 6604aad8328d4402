"""FSDP2 through Lightning (`trainer=fsdp`): the core sharded in one process, and on 2 CPU processes (gloo) sharded
checkpoints that resume exactly and are read consolidated by every command that takes a checkpoint. Training like
DDP and like one process is in `test_distributed.py`, beside DDP's own."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from seq2seq.checkpoints import read_checkpoint
from seq2seq.decoding import greedy
from seq2seq.errors import ConfigError
from seq2seq.sharding import gather, is_sharded, release, shard
from seq2seq.testing import random_batch, tiny_model

FSDP = ["trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
# Dropout on, shuffled token-budget batches: a resume must restore the RNG, the data position and the shards.
BASE = ["experiment=reverse", "model=tiny", "model.dropout=0.1", "data.n_train=384", "data.n_val=32",
        "data.n_test=32", "loader.max_tokens=256", "trainer.max_epochs=-1", "monitor.patience=null",
        "trainer.precision=32-true", *FSDP]
RUN = [*BASE, "trainer.max_steps=30", "save_every_n_steps=2"]


@pytest.fixture
def one_rank(monkeypatch):
    """A process group of this process alone (gloo), for FSDP2 in-process."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def test_bf16_mixed_computes_with_bf16_weights_and_keeps_fp32_shards(one_rank):
    model = tiny_model()
    shard(model, one_rank, "bf16-mixed")
    seen = []
    model.encoder[0].register_forward_pre_hook(lambda layer, args: seen.append(layer.ff.w1.weight.dtype))
    src, src_keep, tgt, tgt_keep = random_batch()
    assert model(src, src_keep, tgt, tgt_keep).dtype == torch.bfloat16 and seen == [torch.bfloat16]
    weight = model.encoder[0].ff.w1.weight
    assert is_sharded(model) and isinstance(weight, DTensor) and weight.dtype == torch.float32


def test_checkpointed_activations_under_fsdp2_give_the_unsharded_gradients(one_rank):
    plain, sharded = tiny_model(checkpoint_activations=True), tiny_model(checkpoint_activations=True)
    shard(sharded, one_rank, "32-true")
    src, src_keep, tgt, tgt_keep = random_batch()
    for model in (plain, sharded):
        model.train()
        model(src, src_keep, tgt, tgt_keep).square().mean().backward()  # the layers' activations recomputed
    for (name, p), q in zip(plain.named_parameters(), sharded.parameters(), strict=True):
        torch.testing.assert_close(q.grad.full_tensor(), p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_decoding_runs_on_gathered_weights_and_equals_the_unsharded_model(one_rank):
    plain, sharded = tiny_model(), tiny_model()
    shard(sharded, one_rank, "32-true")
    src, src_keep, _, _ = random_batch()
    expected = greedy(plain, src, src_keep, bos=1, eos=2, max_len=6)
    gather(sharded)  # decoding calls layer methods that FSDP2's forward hooks never see
    assert not isinstance(sharded.encoder[0].ff.w1.weight, DTensor)
    assert torch.equal(greedy(sharded, src, src_keep, bos=1, eos=2, max_len=6), expected)
    sharded(src, src_keep, *random_batch()[2:])  # a forward while gathered keeps the weights gathered
    assert not isinstance(sharded.decoder[1].ff.w1.weight, DTensor)
    release(sharded)
    assert isinstance(sharded.encoder[0].ff.w1.weight, DTensor)


def test_a_folder_that_is_not_a_whole_sharded_checkpoint_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"is a folder, and not a sharded checkpoint \(it has no meta.pt\)"):
        read_checkpoint(tmp_path)
    torch.save({"hyper_parameters": {}, "global_step": 3}, tmp_path / "meta.pt")  # its shards are missing
    with pytest.raises(ConfigError, match=r"its shards cannot be read .*is the folder whole\?"):
        read_checkpoint(tmp_path)


def _command(*args: str) -> list[str]:
    return [sys.executable, "-m", "seq2seq", *args]


def _cli(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(*args), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _kill_after_a_checkpoint(run_dir) -> None:
    """Starts the run and kills every process of it (SIGKILL, no chance to save) once it has saved a sharded
    checkpoint at step 6 or later."""
    process = subprocess.Popen(_command("train", *RUN, f"hydra.run.dir={run_dir}"), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    meta, deadline = run_dir / "checkpoints" / "last.ckpt" / "meta.pt", time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if torch.load(meta, weights_only=True)["global_step"] >= 6:
                break
        except (OSError, RuntimeError, EOFError, KeyError):
            pass  # not there yet, or being renamed into place
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow  # two processes
def test_a_sharded_run_killed_mid_training_resumes_onto_the_same_weights(tmp_path):
    _cli("train", *RUN, f"hydra.run.dir={tmp_path / 'straight'}")
    _kill_after_a_checkpoint(tmp_path / "killed")
    saved = read_checkpoint(tmp_path / "killed" / "checkpoints" / "last.ckpt")["global_step"]
    assert 6 <= saved < 30
    _cli("train", *RUN, f"resume={tmp_path / 'killed'}")
    straight, resumed = (read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")
                         for name in ("straight", "killed"))
    assert straight["global_step"] == resumed["global_step"] == 30
    for name, weight in straight["state_dict"].items():
        assert torch.equal(weight, resumed["state_dict"][name]), name
    shards = sorted(p.name for p in (tmp_path / "killed" / "checkpoints" / "last.ckpt").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]  # a folder of shards, one per rank
    assert not list((tmp_path / "killed" / "checkpoints").glob("*.partial"))


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    _cli("train", *BASE, "trainer.max_steps=60", f"hydra.run.dir={run}")
    return run


@pytest.mark.slow  # two processes
def test_a_sharded_checkpoint_translates_evaluates_and_consolidates_as_one_file(sharded_run, tmp_path):
    folder = sharded_run / "checkpoints" / "last.ckpt"
    sources = "1 2 3\n4 5 6 7\n"
    direct = subprocess.run(_command("translate", f"ckpt={folder}", f"hydra.run.dir={tmp_path / 't1'}"),
                            input=sources, capture_output=True, text=True, timeout=300)
    assert direct.returncode == 0, direct.stderr[-3000:]
    _cli("average", f"ckpts=[{folder}]", f"output={tmp_path / 'one.ckpt'}")  # one sharded checkpoint: consolidated
    whole = torch.load(tmp_path / "one.ckpt", weights_only=True)
    sharded = read_checkpoint(folder)
    assert whole["global_step"] == sharded["global_step"] == 60 and "optimizer_states" not in whole
    assert whole["state_dict"].keys() == sharded["state_dict"].keys()
    for name, weight in sharded["state_dict"].items():
        assert torch.equal(weight, whole["state_dict"][name]), name
    filed = subprocess.run(_command("translate", f"ckpt={tmp_path / 'one.ckpt'}", f"hydra.run.dir={tmp_path / 't2'}"),
                           input=sources, capture_output=True, text=True, timeout=300)
    assert filed.stdout == direct.stdout and len(direct.stdout.splitlines()) == 2
    # The run's final test (2 ranks, sharded) and one process's, from the checkpoint it kept
    metrics = json.loads((sharded_run / "metrics.json").read_text())
    _cli("evaluate", f"ckpt={metrics['best_checkpoint']}", f"output={tmp_path / 'scores'}")
    scores = json.loads((tmp_path / "scores" / "metrics.json").read_text())
    assert scores["test/exact_match"] == metrics["test/exact_match"]
    assert scores["test/loss"] == pytest.approx(metrics["test/loss"], abs=1e-5)


@pytest.mark.slow  # two processes, twice
def test_compiled_layers_train_under_fsdp_as_eager_ones_do(tmp_path):
    # Token-budget batches: the compiled layers meet several shapes
    steps = [*BASE, "model.dropout=0.0", "trainer.max_steps=14", "trainer.log_every_n_steps=1"]
    _cli("train", *steps, f"hydra.run.dir={tmp_path / 'eager'}")
    compiled = _cli("train", *steps, "model.compile=true", f"hydra.run.dir={tmp_path / 'compiled'}")
    assert "torch.compile: 4 graph(s) compiled at step 1" in compiled.stderr
    eager, fused = (read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt")["state_dict"]
                    for name in ("eager", "compiled"))
    worst = max(float((eager[k] - fused[k]).abs().max()) for k in eager)
    assert worst < 1e-4, f"compiled and eager training differ by up to {worst} after 14 steps"
