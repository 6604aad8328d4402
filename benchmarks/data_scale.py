"""Data at scale: preparing and training on 1M- and 10M-pair ko-en corpora built from the shipped one.

Each synthetic pair joins two shipped pairs (i, j) with j drawn from a seeded generator, so lines differ and lengths
are realistic (about twice the shipped median). Steps, each a fresh `seq2seq` process, timed from outside:

    corpus     build corpora/{1m,10m}.tsv (once; reused when present)
    prepare    `seq2seq prepare` throughput in pairs/s, with 1 and 2 workers (1M), and 2 workers (10M)
    start      `seq2seq train` to its first step (the whole process with one step and no evaluation), on a
               prepared dataset and prepared on the fly
    memory     peak resident set (ru_maxrss) of `seq2seq train` for --train-steps steps of the small preset, 1M
               vs 10M
    throughput training tokens/s of the same model on the same token-budget batches, read from the prepared
               shards vs from in-memory lists of tensors, interleaved in one process (medians)

    python benchmarks/data_scale.py --root /tmp/scale [--steps corpus,prepare,start,memory,throughput]
    python benchmarks/data_scale.py --root /tmp/scale --steps start,memory --python /old/venv/bin/python
        # the same measurements with another installation (e.g. a release before prepared datasets)
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHIPPED = Path(__file__).parents[1] / "plugins" / "text" / "data" / "libreoffice_help_ko_en.tsv.gz"
SIZES = {"1m": 1_000_000, "10m": 10_000_000}
COMMON = ["experiment=translate_ko_en", "data.split_column=split", "tokenizer.fit_sample=200000"]
NO_EVAL = ["trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "trainer.num_sanity_val_steps=0",
           "trainer.enable_progress_bar=false", "trainer.max_epochs=-1"]


def build_corpus(path: Path, n: int) -> None:
    with gzip.open(SHIPPED, "rt", encoding="utf-8") as f:
        rows = [(r["ko"], r["en"]) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                if r["ko"].strip() and r["en"].strip()]
    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as out:
        out.write("ko\ten\tsplit\n")
        for start in range(0, n, 100_000):
            count = min(100_000, n - start)
            first, second = rng.integers(len(rows), size=(2, count))
            split = np.where(rng.random(count) < 0.002, "val", np.where(rng.random(count) < 0.002, "test", "train"))
            out.write("".join(f"{rows[i][0]} {rows[j][0]}\t{rows[i][1]} {rows[j][1]}\t{s}\n"
                              for i, j, s in zip(first, second, split, strict=True)))
    os.replace(f"{path}.tmp", path)


def run(python: str, args: list[str], cwd: Path) -> tuple[float, int, str]:
    """Wall seconds, peak resident set (MiB) and stderr tail of one `seq2seq` process."""
    started = time.monotonic()
    proc = subprocess.Popen([python, "-m", "seq2seq", *args], cwd=cwd, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    if status != 0:
        raise SystemExit(f"seq2seq {' '.join(args)} failed:\n{err[-3000:]}")
    return wall, usage.ru_maxrss // 1024, err[-600:]


def prepare_step(python: str, root: Path, results: dict) -> None:
    for name, workers in (("1m", 1), ("1m", 2), ("10m", 2)):
        dest = root / "prepared" / f"{name}-w{workers}"
        wall, rss, _ = run(python, ["prepare", *COMMON, f"data.path={root / 'corpora' / f'{name}.tsv'}",
                                    f"prepared={dest}", f"workers={workers}"], root)
        results[f"prepare {name} workers={workers}"] = {"s": round(wall, 1), "pairs/s": round(SIZES[name] / wall),
                                                        "peak MiB": rss}
        print(results[f"prepare {name} workers={workers}"], flush=True)


def start_step(python: str, root: Path, results: dict, tag: str) -> None:
    corpus = f"data.path={root / 'corpora' / '1m.tsv'}"
    cases = {"prepared": [f"prepared={root / 'prepared' / '1m-w2'}"], "on the fly": []}
    for case, extra in cases.items():
        if tag != "ours" and case == "prepared":
            continue
        options = COMMON if tag == "ours" else COMMON[:2]
        run_dir = root / "runs" / f"start-{tag}-{case.replace(' ', '-')}"
        wall, rss, _ = run(python, ["train", *options, corpus, *extra, *NO_EVAL, "trainer.max_steps=1",
                                    f"hydra.run.dir={run_dir}"], root)
        results[f"start 1m {case} ({tag})"] = {"s to first step": round(wall, 1), "peak MiB": rss}
        print(case, results[f"start 1m {case} ({tag})"], flush=True)


def memory_step(python: str, root: Path, results: dict, tag: str, steps: int) -> None:
    """The shipped 14k-pair corpus (prepared on the fly) gives the resident set of training itself."""
    for name in ("shipped", "1m", "10m") if tag == "ours" else ("1m",):
        extra = [f"prepared={root / 'prepared' / f'{name}-w2'}"] if tag == "ours" and name != "shipped" else []
        options = COMMON if tag == "ours" else COMMON[:2]
        data = [] if name == "shipped" else [f"data.path={root / 'corpora' / f'{name}.tsv'}"]
        wall, rss, _ = run(python, ["train", *options, *data, *extra,
                                    *NO_EVAL, f"trainer.max_steps={steps}",
                                    f"hydra.run.dir={root / 'runs' / f'memory-{tag}-{name}'}"], root)
        results[f"memory {name} ({tag})"] = {"peak MiB": rss, "s": round(wall, 1)}
        print(name, results[f"memory {name} ({tag})"], flush=True)


def throughput_step(root: Path, results: dict, rounds: int = 5, steps: int = 20) -> None:
    import torch
    from torch.utils.data import DataLoader

    from seq2seq import compose
    from seq2seq.data import Collate
    from seq2seq.datamodule import Seq2SeqDataModule
    from seq2seq.module import Seq2SeqModule, sequence_loss
    from seq2seq.prepared import Prepared

    torch.set_num_threads(1)
    prepared = Prepared(root / "prepared" / "1m-w2")
    config = compose([*COMMON, f"data.path={root / 'corpora' / '1m.tsv'}"])
    module = Seq2SeqModule(config, prepared.tokenizers)
    dm = Seq2SeqDataModule(prepared, Collate.for_tokenizers(module.src_tok, module.tgt_tok), config.loader,
                           config.model.max_positions)
    dm.setup()
    mapped = dm.train_dataloader()
    batches = list(mapped.batch_sampler)[: rounds * steps]  # type: ignore[arg-type]
    in_memory = {i: dm.examples["train"][i] for b in batches for i in b}  # the lists training used to hold
    sources = {"prepared shards": lambda: DataLoader(dm.examples["train"], batch_sampler=batches,
                                                     collate_fn=dm.collate),
               "in-memory lists": lambda: DataLoader(in_memory, batch_sampler=batches,  # type: ignore[arg-type]
                                                     collate_fn=dm.collate)}
    optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
    rates: dict[str, list[float]] = {name: [] for name in sources}
    for r in range(rounds):
        for name, make in sources.items():
            loader = iter(make())
            for _ in range(r * steps):
                next(loader)  # skip to this round's batches
            tokens, started = 0, time.perf_counter()
            for _ in range(steps):
                batch = next(loader)
                loss = sequence_loss(module.model, batch)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                tokens += int(batch.tgt_keep.sum())
            rates[name].append(tokens / (time.perf_counter() - started))
    for name, values in rates.items():
        results[f"training tokens/s, {name}"] = round(statistics.median(values))
    results["ratio prepared / in-memory"] = round(statistics.median(rates["prepared shards"])
                                                  / statistics.median(rates["in-memory lists"]), 3)
    print({k: v for k, v in results.items() if "tokens/s" in k or "ratio" in k}, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--steps", default="corpus,prepare,start,memory,throughput")
    parser.add_argument("--python", default=sys.executable, help="the installation to measure")
    parser.add_argument("--tag", default="ours", help="label of the installation in the results")
    parser.add_argument("--train-steps", type=int, default=200, help="training steps of the memory runs")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the throughput step")
    args = parser.parse_args()
    steps, root, results = args.steps.split(","), args.root.resolve(), {}
    if "corpus" in steps:
        for name, n in SIZES.items():
            if not (root / "corpora" / f"{name}.tsv").is_file():
                build_corpus(root / "corpora" / f"{name}.tsv", n)
    if "prepare" in steps:
        prepare_step(args.python, root, results)
    if "start" in steps:
        start_step(args.python, root, results, args.tag)
    if "memory" in steps:
        memory_step(args.python, root, results, args.tag, args.train_steps)
    if "throughput" in steps:
        throughput_step(root, results, args.rounds)
    out = root / f"results-{args.tag}.json"
    previous = json.loads(out.read_text()) if out.is_file() else {}
    out.write_text(json.dumps({**previous, **results}, indent=1) + "\n")
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
