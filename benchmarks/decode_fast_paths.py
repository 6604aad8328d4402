"""What each decoding fast path is worth: our cached greedy and beam-4 with one fast path switched off at a time.

Each fast path is replaced, inside this benchmark only, by the plain code it stands for; every row decodes exactly
`--new` tokens (EOS is banned), so each variant does the same work and must give the same tokens. Variants are
interleaved in one process; medians. A fast path earns its place at >= 1.10x (plain time / fast time).

    python benchmarks/decode_fast_paths.py                          # small preset: batch 32, 32 + 32 tokens
    python benchmarks/decode_fast_paths.py --preset base --batch 16
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator

import torch
from presets import BOS, EOS, PRESETS, decode_arguments, ours

import seq2seq.beam as beam
import seq2seq.decoding as decoding
from seq2seq.beam import beam_search
from seq2seq.decoding import greedy
from seq2seq.model import DecoderState


def _full_reorder(self: DecoderState, index: torch.Tensor) -> None:
    for cache in self.self_caches:
        cache.reorder(index, None)


def _unpacked(rows: int) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


PLAIN: dict[str, list[tuple[object, str, object]]] = {  # fast path -> [(owner, attribute, plain replacement)]
    "packed weights": [(decoding, "packed_weights", _unpacked), (beam, "packed_weights", _unpacked)],
    "row-wise cache reorder": [(DecoderState, "reorder", _full_reorder)],
}


@contextlib.contextmanager
def plain(name: str) -> Iterator[None]:
    """Inside the block, the fast path `name` (or none, for "all fast paths") is the plain code."""
    if name not in PLAIN:
        yield
        return
    fast = [(owner, attribute, getattr(owner, attribute)) for owner, attribute, _ in PLAIN[name]]
    for owner, attribute, replacement in PLAIN[name]:
        setattr(owner, attribute, replacement)
    try:
        yield
    finally:
        for owner, attribute, original in fast:
            setattr(owner, attribute, original)


def main() -> None:
    args = decode_arguments(__doc__)
    p = PRESETS[args.preset]
    torch.manual_seed(0)
    model = ours(p, dropout=0.0).eval()
    src = torch.randint(3, p["vocab"], (args.batch, args.src_len))
    keep = torch.ones_like(src, dtype=torch.bool)
    no_eos = torch.ones(p["vocab"], dtype=torch.bool)
    no_eos[EOS] = False
    searches: dict[str, Callable[[], torch.Tensor]] = {
        "greedy": lambda: greedy(model, src, keep, bos=BOS, eos=EOS, max_len=args.new, allowed=no_eos),
        "beam-4": lambda: beam_search(model, src, keep, bos=BOS, eos=EOS, max_len=args.new, beam=4,
                                      allowed=no_eos).tokens[:, 0],
    }
    variants = ["all fast paths", *PLAIN]
    times = {(s, v): [] for s in searches for v in variants}
    outputs = {}
    with torch.no_grad():  # as validation decodes (packed weights do not apply to inference tensors)
        for rep in range(args.reps + 1):  # the first pass warms up
            for variant in variants if rep % 2 == 0 else reversed(variants):
                for search, fn in searches.items():
                    with plain(variant):
                        start = time.perf_counter()
                        outputs[search, variant] = fn()
                        if rep:
                            times[search, variant].append(time.perf_counter() - start)
    print(f"preset {args.preset} {p}, batch {args.batch}, source {args.src_len}, {args.new} new tokens per row, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}, {args.reps} reps, medians")
    print(f"{'plain instead of':<26}" + "".join(f"{s + ' tok/s':>14}{'worth':>8}" for s in searches)
          + "   same tokens")
    for variant in variants:
        row = f"{variant if variant != 'all fast paths' else '(nothing: all fast paths)':<26}"
        for search in searches:
            t = statistics.median(times[search, variant])
            fast = statistics.median(times[search, "all fast paths"])
            row += f"{args.batch * args.new / t:>14.0f}{t / fast:>7.2f}x"
        same = all(torch.equal(outputs[s, variant], outputs[s, "all fast paths"]) for s in searches)
        print(row + f"   {same}")


if __name__ == "__main__":
    main()
