"""Training throughput: our encoder-decoder vs a hand-written torch.nn.Transformer loop of the same sizes.

Both train on the same random batches (lengths vary, so padding masks are real) with AdamW and cross-entropy
ignoring padding, dropout on. Runs are interleaved (A B A B ...) in one process and medians are reported, so the
ratio holds on a noisy machine even when absolute figures move.

    python benchmarks/train_throughput.py                 # small preset
    python benchmarks/train_throughput.py --preset base   # the paper's base sizes (slow on a CPU)
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F
from presets import BOS, PAD, PRESETS, ours
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


def time_steps(model: nn.Module, opt: torch.optim.Optimizer, data: list) -> float:
    """Train on `data` once; ours through the loss its training uses, the hand-written one as users write it."""
    model.train()
    start = time.perf_counter()
    for src, src_keep, tgt_in, tgt_keep, tgt_out in data:
        if isinstance(model, EncoderDecoder):
            loss = sequence_loss(model, Batch(src, src_keep, tgt_in, tgt_out))
        else:
            logits = model(src, src_keep, tgt_in, tgt_keep)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1), tgt_out.flatten(), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4, help="training steps per timed run")
    parser.add_argument("--peak-gflops", type=float, default=480.0,
                        help="fp32 matmul limit for MFU (measured 470-490 GFLOP/s via oneDNN on the 2-core CPU)")
    args = parser.parse_args()
    p = PRESETS[args.preset]
    torch.manual_seed(0)
    models = {"hand-written nn.Transformer": HandWritten(p), "seq2seq": ours(p, dropout=0.1)}
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    data = batches(p, args.steps)
    tokens = sum(int(b[3].sum()) for b in data)  # real (non-pad) target tokens
    for name, model in models.items():  # warm-up
        time_steps(model, opts[name], data[:2])
    times: dict[str, list[float]] = {name: [] for name in models}
    for rep in range(args.reps):
        order = list(models) if rep % 2 == 0 else list(reversed(models))
        for name in order:
            times[name].append(time_steps(models[name], opts[name], data))
    flops = step_flops(p, BATCH) * len(data)
    print(f"preset {args.preset}: {p}, batch {BATCH} x length <= {LENGTH}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {args.reps} reps x {args.steps} steps, medians")
    print(f"{'model':<30}{'target tok/s':>14}{'MFU':>8}{'ratio':>8}")
    base = statistics.median(times["hand-written nn.Transformer"])
    for name, ts in times.items():
        t = statistics.median(ts)
        mfu = flops / t / (args.peak_gflops * 1e9)
        print(f"{name:<30}{tokens / t:>14.0f}{mfu:>8.1%}{base / t:>7.2f}x")


if __name__ == "__main__":
    main()
