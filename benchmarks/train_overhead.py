"""What `seq2seq train` costs over a raw loop: steady-state training tokens/s of the Lightning run (its callbacks,
logging, checkpoint bookkeeping and data module as `seq2seq train` sets them up) against a plain PyTorch loop over
the same model, the same prepared batches, optimizer, schedule, gradient clipping and precision.

The data are the experiment's own, prepared once into a temporary folder (as `seq2seq prepare` would). Segments of
`--steps` steps alternate (Lightning, raw, Lightning, ...) on the same module; the first `--warmup` steps of each
segment are not timed; medians over segments. The step time includes waiting for the next batch.

    python benchmarks/train_overhead.py                                  # experiment=translate_ko_en
    python benchmarks/train_overhead.py experiment=reverse trainer.precision=32-true
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from seq2seq.config import compose, resolve_precision
from seq2seq.module import Seq2SeqModule
from seq2seq.preparing import obtain
from seq2seq.registry import DATASETS
from seq2seq.schedule import configure
from seq2seq.trainer import datamodule_for
from seq2seq.training import fit_trainer


class StepTimes(L.Callback):
    """When each training batch starts, and its real target tokens."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.tokens: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())
        self.tokens.append(int(batch.tgt_keep.sum()))

    def on_train_end(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())


def steady(starts: list[float], tokens: list[int], warmup: int) -> float:
    """Tokens/s over the steps after `warmup`."""
    return sum(tokens[warmup:]) / (starts[-1] - starts[warmup])


def raw_loop(module: Seq2SeqModule, loader, steps: int, warmup: int, bf16: bool, clip: float | None) -> float:
    """The loop a user writes: the same loss, AdamW and schedule, clipping, autocast when bf16."""
    optim = configure(module.config.optim, module.model, module.model.spec.d_model, steps)
    opt, sched = optim["optimizer"], optim["lr_scheduler"]["scheduler"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    module.train()
    starts, tokens = [], []
    batches = iter(loader)
    for _ in range(steps):
        starts.append(time.perf_counter())
        batch = next(batches)
        tokens.append(int(batch.tgt_keep.sum()))
        with autocast:
            loss = module.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        opt.step()
        sched.step()
    starts.append(time.perf_counter())
    return steady(starts, tokens, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", default=["experiment=translate_ko_en"])
    parser.add_argument("--steps", type=int, default=40, help="steps per segment")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps at the start of each segment")
    parser.add_argument("--reps", type=int, default=3, help="segments of each kind")
    args = parser.parse_args()
    overrides = [*args.overrides, f"trainer.max_steps={args.steps}", "trainer.max_time=null", "trainer.max_epochs=-1",
                 "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0", "monitor.patience=null"]
    config = compose(overrides)
    precision, _ = resolve_precision(config.trainer)
    L.seed_everything(config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = obtain(config, DATASETS.build(config.data, "data"), Path(tmp) / "prepared")
        module = Seq2SeqModule(config, prepared.tokenizers)
        datamodule = datamodule_for(config, module, prepared, None)
        datamodule.setup("fit")
        ours, raw = [], []
        for rep in range(args.reps):
            trainer = fit_trainer(config, Path(tmp) / f"run{rep}")
            times = StepTimes()
            trainer.callbacks.append(times)
            trainer.fit(module, datamodule=datamodule)
            ours.append(steady(times.starts, times.tokens, args.warmup))
            raw.append(raw_loop(module, datamodule.train_dataloader(), args.steps, args.warmup,
                                precision == "bf16-mixed", config.trainer.gradient_clip_val))
    print(f"{' '.join(args.overrides)}: precision {precision}, threads {torch.get_num_threads()}, {args.reps} x "
          f"{args.steps} steps ({args.warmup} untimed), medians of real target tokens/s")
    print("| loop | target tok/s | vs raw |\n|---|---|---|")
    for name, figures in (("seq2seq train (Lightning)", ours), ("raw PyTorch loop", raw)):
        tokens = statistics.median(figures)
        print(f"| {name} | {tokens:.0f} | {tokens / statistics.median(raw):.3f}x |")


if __name__ == "__main__":
    main()
