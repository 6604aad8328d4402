"""Fine-tuning cost: every weight (full) against LoRA adapters (`model.lora`) on the same model and batches.

Both variants train the preset's model (the paper's base by default: d_model 512, 6 + 6 layers) on the same random
batches with AdamW, one optimizer step per batch. Step times are medians of interleaved runs (full, LoRA, full, ...)
in one process; peak memory is each variant's resident set (VmHWM) when it trains alone in a fresh process, so that
the optimizer state the adapters save shows. The trainable share counts parameters once (tied weights once).

    python benchmarks/lora_finetune.py                    # base preset, rank 8, both variants, with memory
    python benchmarks/lora_finetune.py --preset small --rank 16 --steps 5
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from presets import BOS, PAD, PRESETS, ours

from seq2seq.data import Batch
from seq2seq.lora import LoRASpec, add_adapters
from seq2seq.module import sequence_loss

BATCH, LENGTH = 32, 32
VARIANTS = ("full", "lora")


def model(preset: str, variant: str, rank: int) -> torch.nn.Module:
    torch.manual_seed(0)
    m = ours(PRESETS[preset], dropout=0.1)
    if variant == "lora":
        add_adapters(m, LoRASpec(rank=rank))
    return m.train()


def batches(vocab: int, n: int) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        lengths = torch.randint(LENGTH // 2, LENGTH + 1, (BATCH,), generator=g)
        keep = torch.arange(LENGTH)[None] < lengths[:, None]
        src = torch.randint(3, vocab, (BATCH, LENGTH), generator=g).masked_fill(~keep, PAD)
        tgt = torch.randint(3, vocab, (BATCH, LENGTH), generator=g)
        tgt_in = torch.cat([torch.full((BATCH, 1), BOS), tgt[:, :-1]], 1).masked_fill(~keep, PAD)
        out.append(Batch(src, keep, tgt_in, tgt.masked_fill(~keep, -100)))
    return out


def step(m: torch.nn.Module, opt: torch.optim.Optimizer, batch: Batch) -> float:
    start = time.perf_counter()
    loss = sequence_loss(m, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def trainable_share(m: torch.nn.Module) -> tuple[int, int]:
    params = list(m.parameters())  # each tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def peak_rss(args: argparse.Namespace, variant: str) -> float:
    out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--rank", str(args.rank), "--steps",
                          str(args.steps), "--only", variant, "--rss"], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    return float(out.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="base")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant (after 2 warm-up steps)")
    parser.add_argument("--only", choices=VARIANTS)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--rss", action="store_true", help=argparse.SUPPRESS)  # a child: train, print VmHWM
    args = parser.parse_args()
    names = [args.only] if args.only else list(VARIANTS)
    data = batches(PRESETS[args.preset]["vocab"], args.steps + 2)
    runs = {}
    for name in names:
        m = model(args.preset, name, args.rank)
        runs[name] = (m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4), [])
        for batch in data[:2]:
            step(m, runs[name][1], batch)
    for batch in data[2:]:
        for name in names:  # interleaved: a noisy machine slows both alike
            m, opt, times = runs[name]
            times.append(step(m, opt, batch))
    if args.rss:
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print(int(hwm.split()[1]) / 1024)
        return
    memory = {} if args.no_memory else {name: peak_rss(args, name) for name in names}
    print(f"preset {args.preset}, rank {args.rank}, batch {BATCH} x {LENGTH}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps")
    print(f"{'variant':<8} {'trainable':>12} {'share':>7} {'s/step':>8} {'vs full':>8} {'peak MiB':>9}")
    full = statistics.median(runs["full"][2]) if "full" in runs else None
    for name in names:
        m, _, times = runs[name]
        trainable, total = trainable_share(m)
        median = statistics.median(times)
        ratio = f"{median / full:.2f}x" if full else "-"
        mib = f"{memory[name]:.0f}" if name in memory else "-"
        print(f"{name:<8} {trainable:>12,} {trainable / total:>7.2%} {median:>8.3f} {ratio:>8} {mib:>9}")


if __name__ == "__main__":
    main()
