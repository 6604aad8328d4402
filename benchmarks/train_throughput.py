"""Training throughput: our encoder-decoder (eager and compiled, fp32 and bf16 autocast) vs a hand-written
torch.nn.Transformer loop and Hugging Face `MarianMTModel` of the same sizes.

Every model trains on the same random batches (lengths vary, so padding masks are real) with AdamW, cross-entropy
ignoring padding, dropout 0.1 where torch.nn.Transformer has it. Runs are interleaved (A B C ... C B A ...) in one
process and medians are reported, so ratios hold on a noisy machine even when absolute figures move. MFU is against
the matmul limit of the same dtype, measured here first. With `--memory`, each model also trains alone in a fresh
process to read its peak resident memory.

    python benchmarks/train_throughput.py                 # small preset
    python benchmarks/train_throughput.py --preset base   # the paper's base sizes (slow on a CPU)
    python benchmarks/train_throughput.py --only "seq2seq bf16" --memory
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from presets import BOS, PAD, PRESETS, marian, ours
from torch import nn

from seq2seq.data import Batch
from seq2seq.embeddings import SinusoidalPositions
from seq2seq.model import EncoderDecoder
from seq2seq.module import sequence_loss

BATCH, LENGTH = 32, 32


class HandWritten(nn.Module):
    """What a user writes without a framework: embeddings + positions + nn.Transformer + tied projection."""

    def __init__(self, p: dict) -> None:
        super().__init__()
        d = p["d_model"]
        self.embed = nn.Embedding(p["vocab"], d, padding_idx=PAD)
        # Same init as ours. nn.Embedding's default N(0, 1), tied to the output, saturates the softmax and makes
        # denormal gradients, which slow CPU matmuls several-fold: that would measure the init, not the code.
        nn.init.normal_(self.embed.weight, std=d**-0.5)
        self.pos = SinusoidalPositions(d, 1024)
        self.transformer = nn.Transformer(d, p["n_heads"], p["layers"], p["layers"], p["d_ff"], dropout=0.1,
                                          batch_first=True)
        self.out = nn.Linear(d, p["vocab"], bias=False)
        self.out.weight = self.embed.weight
        self.scale = math.sqrt(d)

    def forward(self, src, src_keep, tgt_in, tgt_keep):
        T = tgt_in.shape[1]
        h = self.transformer(
            self.pos(self.embed(src) * self.scale), self.pos(self.embed(tgt_in) * self.scale),
            tgt_mask=~torch.ones(T, T, dtype=torch.bool).tril(),
            src_key_padding_mask=~src_keep, tgt_key_padding_mask=~tgt_keep, memory_key_padding_mask=~src_keep,
        )
        return self.out(h)


def batches(p: dict, n: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    B, L, V = BATCH, LENGTH, p["vocab"]
    out = []
    for _ in range(n):
        src_len = torch.randint(L // 2, L + 1, (B,), generator=g)
        tgt_len = torch.randint(L // 2, L + 1, (B,), generator=g)
        src_keep = torch.arange(L)[None] < src_len[:, None]
        tgt_keep = torch.arange(L)[None] < tgt_len[:, None]
        src = torch.randint(3, V, (B, L), generator=g).masked_fill(~src_keep, PAD)
        tgt_out = torch.randint(3, V, (B, L), generator=g).masked_fill(~tgt_keep, -100)
        tgt_in = torch.cat([torch.full((B, 1), BOS), tgt_out[:, :-1].clamp(min=0)], dim=1).masked_fill(~tgt_keep, PAD)
        out.append((src, src_keep, tgt_in, tgt_keep, tgt_out))
    return out


def step_flops(p: dict, B: int) -> float:
    """FLOPs of one training step on padded shapes: 6 FLOPs per weight per token for the matmuls (forward +
    backward: projections and feed-forward of each layer, the output projection) plus 12 · d per query-key pair
    for the attention scores and weighted sums."""
    d, dff, V, Le, Ld = p["d_model"], p["d_ff"], p["vocab"], p["layers"], p["layers"]
    S = T = LENGTH
    return B * (6 * S * (Le * (4 * d * d + 2 * d * dff) + Ld * 2 * d * d)
                + 6 * T * (Ld * (6 * d * d + 2 * d * dff) + d * V)
                + 12 * d * (Le * S * S + Ld * (T * T + T * S)))


def matmul_limit(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """The best GFLOP/s of an n x n matmul in `dtype`, through MKL (torch.mm) or oneDNN (mkldnn_linear): the
    ceiling a training step's matmuls can reach on this machine."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    kernels = {"mm": lambda: torch.mm(a, b)}
    if torch.backends.mkldnn.is_available():
        a_dnn, b_dnn = a.to_mkldnn(), b.to_mkldnn()

        def onednn() -> torch.Tensor:
            return torch._C._nn.mkldnn_linear(a_dnn, b_dnn, None)

        kernels["oneDNN"] = onednn
    best = 0.0
    for kernel in kernels.values():
        kernel()
        for _ in range(reps):
            start = time.perf_counter()
            kernel()
            best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


class Runner:
    """One model, its optimizer and the way it computes its loss, in one precision."""

    def __init__(self, kind: str, p: dict, bf16: bool, compiled: bool = False) -> None:
        self.kind, self.bf16 = kind, bf16
        self.model = {"hand": lambda: HandWritten(p), "marian": lambda: marian(p, dropout=0.1),
                      "ours": lambda: ours(p, dropout=0.1)}[kind]()
        if compiled:
            self.model.compile_layers()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def loss(self, src, src_keep, tgt_in, tgt_keep, tgt_out) -> torch.Tensor:
        if isinstance(self.model, EncoderDecoder):  # through the loss its training uses
            return sequence_loss(self.model, Batch(src, src_keep, tgt_in, tgt_out))
        if self.kind == "marian":  # as HF users train it: labels in, loss out
            return self.model(input_ids=src, attention_mask=src_keep, decoder_input_ids=tgt_in,
                              decoder_attention_mask=tgt_keep, labels=tgt_out).loss
        logits = self.model(src, src_keep, tgt_in, tgt_keep)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt_out.flatten(), ignore_index=-100)

    def train(self, data: list) -> float:
        """Train on `data` once; seconds."""
        self.model.train()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        start = time.perf_counter()
        for batch in data:
            with autocast:
                loss = self.loss(*batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return time.perf_counter() - start


VARIANTS = {  # name: (model, bf16 autocast, compiled)
    "hand-written fp32": ("hand", False, False), "HF Marian fp32": ("marian", False, False),
    "seq2seq fp32": ("ours", False, False), "seq2seq compiled fp32": ("ours", False, True),
    "hand-written bf16": ("hand", True, False), "HF Marian bf16": ("marian", True, False),
    "seq2seq bf16": ("ours", True, False), "seq2seq compiled bf16": ("ours", True, True),
}


def peak_rss(args: argparse.Namespace, name: str) -> float:
    """Peak resident MiB of `name` training alone (warm-up and one timed run) in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--preset", args.preset, "--only", name, "--reps", "1",
                          "--steps", str(args.steps), "--rss"], capture_output=True, text=True, check=True).stdout
    return float(out.split("peak_rss_mib")[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed run")
    parser.add_argument("--only", action="append", choices=VARIANTS, help="run these variants (default: all)")
    parser.add_argument("--memory", action="store_true", help="also measure each variant's peak RSS alone")
    parser.add_argument("--rss", action="store_true", help=argparse.SUPPRESS)  # a child of --memory
    args = parser.parse_args()
    p = PRESETS[args.preset]
    names = args.only or list(VARIANTS)
    torch.manual_seed(0)
    runners = {name: Runner(VARIANTS[name][0], p, *VARIANTS[name][1:]) for name in names}
    data = batches(p, args.steps)
    for runner in runners.values():  # warm-up (and compilation)
        runner.train(data[:2])
    if args.rss:
        runners[names[0]].train(data)
        # VmHWM, not ru_maxrss, which a child inherits from the parent it forked from
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        print("peak_rss_mib", int(hwm.split()[1]) / 1024)
        return
    # Only the precisions the variants run: a CPU without native bf16 takes minutes over a bf16 matmul.
    limits = {bf16: matmul_limit(torch.bfloat16 if bf16 else torch.float32)
              for bf16 in sorted({VARIANTS[name][1] for name in names})}
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(args.reps):
        for name in names if rep % 2 == 0 else reversed(names):
            times[name].append(runners[name].train(data))
    tokens = sum(int(b[3].sum()) for b in data)  # real (non-pad) target tokens
    flops = step_flops(p, BATCH) * len(data)
    print(f"preset {args.preset}: {p}, batch {BATCH} x length <= {LENGTH}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.reps} reps x {args.steps} steps, medians; matmul limit "
          + ", ".join(f"{'bf16' if bf16 else 'fp32'} {limit:.0f}" for bf16, limit in limits.items()) + " GFLOP/s")
    memory = {name: peak_rss(args, name) for name in names} if args.memory else {}
    print(f"| {'model':<24}| {'target tok/s':>12} | {'MFU':>6} | vs hand-written | {'peak RSS MiB':>12} |")
    print(f"|{'-' * 25}|{'-' * 14}|{'-' * 8}|{'-' * 17}|{'-' * 14}|")
    for name in names:
        t, bf16 = statistics.median(times[name]), VARIANTS[name][1]
        base = f"hand-written {'bf16' if bf16 else 'fp32'}"
        ratio = f"{statistics.median(times[base]) / t:.2f}x" if base in times else "-"
        mib = f"{memory[name]:.0f}" if name in memory else "-"
        print(f"| {name:<24}| {tokens / t:>12.0f} | {flops / t / (limits[bf16] * 1e9):>6.1%} | {ratio:>15} "
              f"| {mib:>12} |")


if __name__ == "__main__":
    main()
