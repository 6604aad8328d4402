"""Decoding throughput: our cached greedy and beam search vs Hugging Face `MarianMTModel.generate()` with cache.

Both models have the same sizes and random weights (nothing is downloaded); every row decodes exactly `--new`
tokens (EOS is excluded for ours, `min_new_tokens` for HF), so both do the same work. Runs are interleaved in one
process; medians. Needs `pip install transformers`.

    python benchmarks/decode_throughput.py                 # small preset: batch 32, 32 source and 32 new tokens
    python benchmarks/decode_throughput.py --preset base --batch 16
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from presets import BOS, EOS, PRESETS, decode_arguments, marian, ours

from seq2seq.beam import beam_search
from seq2seq.decoding import greedy


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    args = decode_arguments(__doc__)
    p = PRESETS[args.preset]
    torch.manual_seed(0)
    model, hf = ours(p, dropout=0.0).eval(), marian(p).eval()
    src = torch.randint(3, p["vocab"], (args.batch, args.src_len))
    keep = torch.ones_like(src, dtype=torch.bool)
    no_eos = torch.ones(p["vocab"], dtype=torch.bool)
    no_eos[EOS] = False
    n = args.new

    def hf_generate(beams: int) -> torch.Tensor:
        return hf.generate(input_ids=src, attention_mask=keep.long(), num_beams=beams, do_sample=False,
                           use_cache=True, min_new_tokens=n, max_new_tokens=n)

    runs: dict[str, Callable[[], torch.Tensor]] = {
        "HF greedy (cache)": lambda: hf_generate(1),
        "seq2seq greedy (cache)": lambda: greedy(model, src, keep, bos=BOS, eos=EOS, max_len=n, allowed=no_eos),
        "HF beam-4 (cache)": lambda: hf_generate(4),
        "seq2seq beam-4 (cache)": lambda: beam_search(model, src, keep, bos=BOS, eos=EOS, max_len=n, beam=4,
                                                     allowed=no_eos).tokens[:, 0],
    }
    with torch.inference_mode():
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for rep in range(args.reps):
            for name in list(runs) if rep % 2 == 0 else list(reversed(runs)):
                times[name].append(timed(runs[name])[0])
        uncached = greedy(model, src, keep, bos=BOS, eos=EOS, max_len=n, allowed=no_eos, use_cache=False)
        same = torch.equal(runs["seq2seq greedy (cache)"](), uncached)
    print(f"preset {args.preset} {p}, batch {args.batch}, source {args.src_len}, {n} new tokens per row, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.reps} reps, medians")
    print(f"{'decoder':<26}{'output tok/s':>14}{'vs HF':>8}")
    for name, ts in times.items():
        rate = args.batch * n / statistics.median(ts)
        peer = "HF " + name.split(" ", 1)[1]
        ratio = statistics.median(times[peer]) / statistics.median(ts)
        print(f"{name:<26}{rate:>14.0f}{ratio:>7.2f}x")
    print(f"cached greedy == uncached greedy: {same}")


if __name__ == "__main__":
    main()
