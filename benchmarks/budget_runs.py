"""Quality by training budget: `seq2seq train` runs of one experiment at fixed step counts, two at a time.

A machine's 30 minutes are simulated by the steps they allow (`trainer.max_steps=N trainer.max_time=null`, so the
schedule is shaped to N): 250 steps stand for a slow 2-core CPU, 950 for a fast one. Each run is one process on one
core (`taskset`, one thread), one on each of `--cores` side by side; the table gives test BLEU and chrF of the weights
each run kept, and the seconds a training step took (from its progress lines).

    python benchmarks/budget_runs.py --steps 250 450 --seeds 0 1 2 \\
        --variant today= --variant linear="optim.schedule=linear optim.warmup_fraction=0.1 optim.lr=2e-3"
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from itertools import product
from pathlib import Path

STEP_LINE = re.compile(r"step (\d+)/\d+, epoch \d+, train/loss \S+, (\d+) s")


def seconds_per_step(log: str) -> float | None:
    found = [(int(step), int(secs)) for step, secs in STEP_LINE.findall(log)]
    if len(found) < 2:
        return None
    (s0, t0), (s1, t1) = found[0], found[-1]
    return (t1 - t0) / (s1 - s0)


def launch(experiment: str, variant: str, overrides: str, steps: int, seed: int, root: Path, core: int
           ) -> tuple[subprocess.Popen, Path]:
    run_dir = root / f"{variant}-{steps}-s{seed}"
    args = [sys.executable, "-m", "seq2seq", "train", f"experiment={experiment}", f"trainer.max_steps={steps}",
            "trainer.max_time=null", f"seed={seed}", "trainer.log_every_n_steps=10", *shlex.split(overrides),
            f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    log = open(root / f"{run_dir.name}.log", "w")  # noqa: SIM115 - closed with the process
    process = subprocess.Popen(["taskset", "-c", str(core), *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, run_dir


def result(run_dir: Path, log_path: Path, wall: float) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    return {"run": run_dir.name, "test/bleu": metrics.get("test/bleu"), "test/chrf": metrics.get("test/chrf"),
            "val/bleu": metrics.get("val/bleu"), "kept": Path(metrics.get("best_checkpoint", "?")).name,
            "s/step": seconds_per_step(log_path.read_text()), "wall_s": round(wall)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", default="translate_ko_en")
    parser.add_argument("--steps", type=int, nargs="+", default=[250, 450])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--variant", action="append", default=[], help="name=overrides (empty: the defaults)")
    parser.add_argument("--cores", type=int, nargs="+", default=[0, 1], help="one run at a time on each")
    parser.add_argument("--root", type=Path, default=Path("runs/budget"))
    args = parser.parse_args()
    variants = [v.split("=", 1) for v in args.variant] or [["defaults", ""]]
    jobs = [(name, overrides, steps, seed) for steps, (name, overrides), seed
            in product(sorted(args.steps, reverse=True), variants, args.seeds)]  # the long ones first
    args.root.mkdir(parents=True, exist_ok=True)
    running: dict[int, tuple[subprocess.Popen, Path, float]] = {}
    results = []
    while jobs or running:
        for core in args.cores:
            if core not in running and jobs:
                name, overrides, steps, seed = jobs.pop(0)
                process, run_dir = launch(args.experiment, name, overrides, steps, seed, args.root, core)
                running[core] = (process, run_dir, time.monotonic())
        time.sleep(5)
        for core, (process, run_dir, started) in list(running.items()):
            if process.poll() is not None:
                found = result(run_dir, args.root / f"{run_dir.name}.log", time.monotonic() - started)
                results.append(found)
                print(json.dumps(found), flush=True)
                with open(args.root / "results.jsonl", "a") as out:
                    out.write(json.dumps(found) + "\n")
                del running[core]
    print("\n| run | test BLEU | test chrF | val BLEU | kept | s/step | wall s |\n|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: r["run"]):
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        print(f"| {r['run']} | {fmt(r['test/bleu'])} | {fmt(r['test/chrf'])} | {fmt(r['val/bleu'])} | {r['kept']} "
              f"| {fmt(r['s/step'])} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
