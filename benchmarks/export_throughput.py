"""Decoding throughput of one trained model on every backend: eager, CTranslate2 fp32 and int8, ONNX Runtime.

The checkpoint is exported (without the parity check: `seq2seq export` does that) into a scratch folder; each backend
decodes the first `--n` test sources through `Translator` (tokenization and batching included, batches of
`--batch` sources of similar length), greedy and beam-4, at 1 and 2 threads. Output tokens/s counts the tokens each
backend produced (EOS excluded). Runs are interleaved in one process, medians; BLEU and chrF of every backend on
those sources come from the same outputs.

    seq2seq train experiment=translate_ko_en model=small hydra.run.dir=runs/ko_en_small
    python benchmarks/export_throughput.py --ckpt runs/ko_en_small/checkpoints/best-*.ckpt
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from seq2seq import Translator
from seq2seq.exporting import export, metrics_of
from seq2seq.registry import DATASETS

BACKENDS = {"eager": None, "ct2 fp32": ("ctranslate2", "none"), "ct2 int8": ("ctranslate2", "int8"),
            "onnx": ("onnx", "none")}


Key = tuple[int, str, int]  # threads, backend, beam


def measure(runs: dict[Key, Translator], sources: list[str], thread_counts: list[int], reps: int
            ) -> tuple[dict[Key, list[float]], dict[Key, list[list[int]]]]:
    """Seconds of each run, interleaved (alternating order), per thread count; and each run's outputs."""
    times: dict[Key, list[float]] = {key: [] for key in runs}
    outputs: dict[Key, list[list[int]]] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        keys = [k for k in runs if k[0] == threads]
        for key in keys:  # warm-up
            runs[key].tokens(sources[:32])
        for rep in range(reps):
            for key in keys if rep % 2 == 0 else reversed(keys):
                start = time.perf_counter()
                outputs[key] = runs[key].tokens(sources)
                times[key].append(time.perf_counter() - start)
    return times, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--n", type=int, default=256, help="test sources decoded per run")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    eager = Translator.from_checkpoint(args.ckpt, args.batch)
    pairs = DATASETS.build(eager.module.config.data, "data").read("test").pairs[: args.n]
    sources = [s for s, _ in pairs]
    refs = [eager.module.tgt_tok.encode(t).tolist() for _, t in pairs]
    with tempfile.TemporaryDirectory() as scratch:
        folders = {}
        for name, target in BACKENDS.items():
            if target is not None:
                folders[name] = Path(scratch) / name.replace(" ", "_")
                export(args.ckpt, target[0], folders[name], quantization=target[1], check=None)
        runs: dict[Key, Translator] = {}
        for threads in args.threads:
            for name in BACKENDS:
                base = eager if name == "eager" else Translator.from_checkpoint(folders[name], args.batch, threads)
                for beam in (1, 4):
                    runs[(threads, name, beam)] = base.with_decoding(beam=beam)
        times, outputs = measure(runs, sources, args.threads, args.reps)
    print(f"checkpoint {args.ckpt}: {args.n} test sources, batches of {args.batch}, torch {torch.__version__}, "
          f"{args.reps} reps, medians")
    print(f"{'threads':>7} {'backend':<10}{'search':>8}{'output tok/s':>14}{'vs eager':>10}{'BLEU':>7}{'chrF':>7}")
    for (threads, name, beam), ts in times.items():
        produced = sum(len(o) for o in outputs[(threads, name, beam)])
        rate = produced / statistics.median(ts)
        eager_key = (threads, "eager", beam)
        eager_rate = sum(len(o) for o in outputs[eager_key]) / statistics.median(times[eager_key])
        scores = metrics_of(eager.module, outputs[(threads, name, beam)], refs)
        search = "greedy" if beam == 1 else f"beam-{beam}"
        print(f"{threads:>7} {name:<10}{search:>8}{rate:>14.0f}{rate / eager_rate:>9.2f}x"
              f"{scores.get('bleu', float('nan')):>7.2f}{scores.get('chrf', float('nan')):>7.2f}")


if __name__ == "__main__":
    main()
