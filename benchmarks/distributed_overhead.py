"""Step time of FSDP2 (`trainer=fsdp`) against DDP (`trainer=ddp`) on 2 processes, through `seq2seq train` as a user
runs it.

Each run trains `--short` and then `--long` steps from scratch, without validation or final scoring; the step time
is the difference of the two wall times over the difference of the steps, so start-up (imports, data preparation,
process launch, the first steps) cancels. Runs alternate (DDP, FSDP2, FSDP2, DDP, ...) and medians are reported.
The default model is the reverse task at d_model 256 in fp32 on CPU processes (gloo); extra arguments are overrides.

    python benchmarks/distributed_overhead.py
    python benchmarks/distributed_overhead.py --repeats 5 model.d_model=512 model.d_ff=2048
    python benchmarks/distributed_overhead.py trainer.accelerator=gpu trainer.precision=bf16-mixed   # 2 GPUs
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STRATEGIES = {"ddp": "trainer=ddp", "fsdp2": "trainer=fsdp"}
BASE = ["experiment=reverse", "data.n_train=4096", "model.d_model=256", "model.d_ff=1024", "trainer.devices=2",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_epochs=-1", "trainer.limit_val_batches=0",
        "trainer.limit_test_batches=0", "trainer.num_sanity_val_steps=0", "monitor.patience=null",
        "trainer.enable_progress_bar=false"]


def run(strategy: str, steps: int, overrides: list[str], root: Path) -> float:
    """Wall seconds of one `seq2seq train` of `steps` steps."""
    out = root / f"{strategy}-{steps}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "seq2seq", "train", *BASE, STRATEGIES[strategy], f"trainer.max_steps={steps}",
               *overrides, f"hydra.run.dir={out}"]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{strategy}: seq2seq train failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", type=int, default=10)
    parser.add_argument("--long", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    args, overrides = parser.parse_known_args()
    per_step: dict[str, list[float]] = {name: [] for name in STRATEGIES}
    with tempfile.TemporaryDirectory() as scratch:
        for r in range(args.repeats):
            for name in (STRATEGIES if r % 2 == 0 else reversed(STRATEGIES)):
                short = run(name, args.short, overrides, Path(scratch))
                long = run(name, args.long, overrides, Path(scratch))
                per_step[name].append((long - short) / (args.long - args.short))
                print(f"  {name}: {1000 * per_step[name][-1]:.1f} ms/step", flush=True)
    ddp = statistics.median(per_step["ddp"])
    print(f"\n{'strategy':<8} {'ms/step':>9} {'vs ddp':>7}   ({args.repeats} repeats, steps {args.short}->{args.long}, "
          f"{' '.join(overrides) or 'defaults'})")
    for name, times in per_step.items():
        print(f"{name:<8} {1000 * statistics.median(times):>9.1f} {statistics.median(times) / ddp:>6.2f}x")


if __name__ == "__main__":
    main()
