"""What the launcher (torchrun, SLURM, Lightning's own re-launch) told this process, read from the environment
without importing torch or Lightning."""

from __future__ import annotations

import os

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")  # Lightning's order


def global_rank() -> int:
    """This process's global rank as Lightning's `rank_zero_only.rank` will see it: the first of the launchers'
    variables that is set, else 0."""
    return next((int(os.environ[name]) for name in RANK_VARIABLES if name in os.environ), 0)
