"""What the launcher (torchrun, SLURM's srun, Lightning's own re-launch) told this process, read from the
environment without importing torch or Lightning, and the preflight that compares it with `trainer.*` before any
work: a job whose launcher starts another number of processes than the trainer expects would hang at its first
collective, or silently train on fewer devices."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order
INTERACTIVE = ("bash", "interactive")  # SLURM job names of an allocation a user works in (Lightning's rule)


def global_rank(env: Mapping[str, str] = os.environ) -> int:
    """This process's global rank as Lightning's `rank_zero_only.rank` will see it: the first of the launchers'
    variables that is set, else 0."""
    return next((int(env[name]) for name in RANK_VARIABLES if name in env), 0)


@dataclass(frozen=True)
class Launch:
    """The processes a launcher started: in all, per node, and on how many nodes (None: not said)."""

    launcher: str  # torchrun, slurm, or none (this process alone, or Lightning starts the others)
    world_size: int | None = None
    per_node: int | None = None
    nodes: int | None = None
    rank: int = 0
    node_rank: int = 0

    def describe(self) -> str:
        if self.launcher == "none":
            return "no launcher: this process, and the processes Lightning starts for `trainer.devices`"
        return (f"{self.launcher}: {self.world_size} process(es), {self.per_node} a node on {self.nodes} node(s); "
                f"this one is rank {self.rank}, on node {self.node_rank}")


def _count(value: str | None) -> int | None:
    """SLURM's task counts: `4`, or `4(x2)` when every node has 4."""
    return None if value is None else int(value.split("(")[0])


def launch(env: Mapping[str, str] = os.environ) -> Launch:
    """What launched this process, from its environment."""
    if "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in INTERACTIVE:
        return Launch("slurm", _count(env["SLURM_NTASKS"]), _count(env.get("SLURM_NTASKS_PER_NODE")),
                      _count(env.get("SLURM_NNODES")), int(env.get("SLURM_PROCID", 0)),
                      int(env.get("SLURM_NODEID", 0)))
    if "TORCHELASTIC_RUN_ID" in env:
        world, per_node = int(env["WORLD_SIZE"]), int(env["LOCAL_WORLD_SIZE"])
        return Launch("torchrun", world, per_node, int(env.get("GROUP_WORLD_SIZE", world // per_node)),
                      int(env.get("RANK", 0)), int(env.get("GROUP_RANK", 0)))
    return Launch("none")


def devices_per_node(devices: Any) -> int | None:
    """`trainer.devices` as a count (None for auto: the machine decides)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        return int(devices)
    except (TypeError, ValueError):
        return None


def preflight(devices: Any, num_nodes: int, env: Mapping[str, str] = os.environ) -> list[str]:
    """Each way the launcher's processes and `trainer.devices` × `trainer.num_nodes` disagree, with the fix."""
    found, per_node = launch(env), devices_per_node(devices)
    if found.launcher == "none":
        if num_nodes > 1 and not {"MASTER_ADDR", "NODE_RANK"} <= env.keys():
            return [f"`trainer.num_nodes={num_nodes}` needs the job started on every node: by torchrun or SLURM's "
                    "srun, or by hand with MASTER_ADDR, MASTER_PORT and NODE_RANK set (docs/distributed.md)"]
        return []
    flag = "--ntasks-per-node" if found.launcher == "slurm" else "--nproc-per-node"
    nodes_flag = "--nodes" if found.launcher == "slurm" else "--nnodes"
    problems = []
    if per_node is not None and found.per_node is not None and found.per_node != per_node:
        problems.append(f"{found.launcher} starts {found.per_node} process(es) a node ({flag}) and "
                        f"`trainer.devices={devices}` expects {per_node}: make them equal")
    if found.nodes is not None and found.nodes != num_nodes:
        problems.append(f"{found.launcher} runs on {found.nodes} node(s) ({nodes_flag}) and "
                        f"`trainer.num_nodes={num_nodes}`: make them equal")
    if per_node is not None and found.world_size is not None and found.world_size != per_node * num_nodes \
            and not problems:
        problems.append(f"{found.launcher} starts {found.world_size} process(es) in all, and `trainer.devices` × "
                        f"`trainer.num_nodes` is {per_node} × {num_nodes} = {per_node * num_nodes}: make them equal")
    return problems
