"""Launching: the preflight that compares the launcher's processes with `trainer.*` before any work, `--check`, and
two "nodes" of one process each on this machine through torchrun's c10d rendezvous."""

import socket
import subprocess
import sys

import pytest
from conftest import cli

from seq2seq.checkpoints import read_checkpoint
from seq2seq.launch import global_rank, launch, preflight

SLURM = {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4(x2)", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "train",
         "SLURM_PROCID": "5", "SLURM_NODEID": "1"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "GROUP_WORLD_SIZE": "2",
            "RANK": "3", "GROUP_RANK": "1", "LOCAL_RANK": "1"}


def test_the_launchers_are_read_from_the_environment():
    slurm, torchrun = launch(SLURM), launch(TORCHRUN)
    assert (slurm.launcher, slurm.world_size, slurm.per_node, slurm.nodes, slurm.rank, slurm.node_rank) == \
        ("slurm", 8, 4, 2, 5, 1)
    assert (torchrun.launcher, torchrun.world_size, torchrun.per_node, torchrun.nodes, torchrun.rank,
            torchrun.node_rank) == ("torchrun", 4, 2, 2, 3, 1)
    assert launch({**SLURM, "SLURM_JOB_NAME": "bash"}).launcher == "none"  # an interactive allocation
    assert global_rank(TORCHRUN) == 3 and global_rank(SLURM) == 5 and global_rank({}) == 0


def test_the_preflight_accepts_a_matching_launch():
    assert preflight(4, 2, SLURM) == [] and preflight(2, 2, TORCHRUN) == [] and preflight([0, 1], 2, TORCHRUN) == []
    assert preflight("auto", 2, SLURM) == []  # the machine decides the devices; the nodes agree
    assert preflight(1, 1, {}) == []
    assert preflight(8, 2, {"MASTER_ADDR": "10.0.0.1", "NODE_RANK": "1"}) == []  # started by hand on each node


@pytest.mark.parametrize(("devices", "nodes", "env", "expected"), [
    (4, 2, {**{k: v for k, v in SLURM.items() if k != "SLURM_NTASKS_PER_NODE"}, "SLURM_NTASKS": "6"},
     "slurm starts 6 process(es) in all, and `trainer.devices` × `trainer.num_nodes` is 4 × 2 = 8"),
    (2, 2, SLURM, "slurm starts 4 process(es) a node (--ntasks-per-node) and `trainer.devices=2` expects 2"),
    (4, 1, SLURM, "slurm runs on 2 node(s) (--nodes) and `trainer.num_nodes=1`"),
    (4, 2, TORCHRUN, "torchrun starts 2 process(es) a node (--nproc-per-node) and `trainer.devices=4`"),
    (2, 2, {}, "`trainer.num_nodes=2` needs the job started on every node"),
])
def test_the_preflight_refuses_a_launch_that_disagrees_with_the_trainer(devices, nodes, env, expected):
    problems = preflight(devices, nodes, env)
    assert len(problems) == 1 and expected in problems[0], problems


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "seq2seq", *args], capture_output=True, text=True, timeout=300)


def test_check_validates_without_work_and_refuses_a_mismatch_before_any(tmp_path, monkeypatch):
    ok = cli("train", "experiment=reverse", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
              "--check", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "config is valid" in ok.stdout and "strategy ddp" in ok.stdout and "no launcher" in ok.stdout
    for name, value in {**SLURM, "SLURM_NTASKS_PER_NODE": "2(x2)", "SLURM_NTASKS": "4", "SLURM_PROCID": "0"}.items():
        monkeypatch.setenv(name, value)
    refused = cli("train", "experiment=reverse", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                  "trainer.accelerator=cpu", cwd=tmp_path)
    assert refused.returncode == 2 and "--ntasks-per-node" in refused.stderr, refused.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []  # rank 0 leaves nothing: no run directory, no prepared data


@pytest.mark.slow
def test_two_nodes_of_one_process_through_torchrun_train_as_two_devices_of_one_node(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    common = ["experiment=reverse", "model=tiny", "data.n_train=128", "data.n_val=32", "data.n_test=32",
              "trainer.max_steps=6", "trainer.max_epochs=-1", "monitor.patience=null", "trainer.precision=32-true",
              "trainer=ddp", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes",
                "-m", "seq2seq", "train", *common, "trainer.devices=1", "trainer.num_nodes=2",
                f"hydra.run.dir={tmp_path / 'nodes'}"]
    nodes = [subprocess.Popen(torchrun, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in outputs]
    one_node = _cli("train", *common, "trainer.devices=2", f"hydra.run.dir={tmp_path / 'one_node'}")
    assert one_node.returncode == 0, one_node.stderr[-2000:]
    two, one = (read_checkpoint(tmp_path / name / "checkpoints" / "last.ckpt") for name in ("nodes", "one_node"))
    assert two["global_step"] == one["global_step"] == 6
    worst = max(float((two["state_dict"][k] - one["state_dict"][k]).abs().max()) for k in one["state_dict"])
    # The same ranks, batches and dropout masks; the processes' thread counts differ (torchrun's and Lightning's
    # launchers), and with them the float summation order
    assert worst < 1e-4, f"two nodes and one node of two devices differ by up to {worst}"
