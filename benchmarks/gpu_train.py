"""One GPU: the paper's base model trained through `seq2seq train`'s Trainer in bf16, eager and compiled, then
decoded greedily and with beam 4; and the beam search's cache reorder checked for host syncs.

Training runs `fit_trainer` (what `seq2seq train` builds: its callbacks, logging, data module) for `--steps` steps
on the experiment's prepared data, without validation; tokens/s are real target tokens over the steps after
`--warmup`. MFU is the model's training FLOPs (counted by `torch.utils.flop_counter` on one batch, forward and
backward) per second against the device's bf16 matmul rate, measured here on an 8192² matmul (and against the
nominal dense bf16 peak for H100/H200). Recompilations are the graphs dynamo compiled after the first step. Without
a GPU (or with `--cpu`) it runs the tiny model in fp32 on the CPU, in seconds: the same code, what CI can check.

    python benchmarks/gpu_train.py                       # experiment=translate_ko_en model=base, bf16, on cuda:0
    python benchmarks/gpu_train.py --cpu                 # the fallback: experiment=reverse model=tiny, fp32
    python benchmarks/gpu_train.py --steps 200 model.d_model=1024
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch._dynamo.utils import counters
from torch.utils.flop_counter import FlopCounterMode
from train_overhead import StepTimes, steady

from seq2seq.config import compose
from seq2seq.module import Seq2SeqModule
from seq2seq.preparing import obtain
from seq2seq.registry import DATASETS
from seq2seq.trainer import datamodule_for
from seq2seq.training import fit_trainer
from seq2seq.translate import Translator

NOMINAL_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, SXM


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of the best of five n x n matmuls."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(5):
        sync(device)
        started = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident (process)"


def flops_per_token(module: Seq2SeqModule, batch) -> float:
    """Training FLOPs (forward and backward) of one batch, per real target token."""
    with FlopCounterMode(display=False) as counter:
        module.loss(batch).backward()
    module.zero_grad(set_to_none=True)
    return counter.get_total_flops() / int(batch.tgt_keep.sum())


class Graphs(StepTimes):
    """StepTimes, and how many graphs dynamo had compiled when each batch started."""

    def __init__(self) -> None:
        super().__init__()
        self.graphs: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, module, batch, batch_idx)
        self.graphs.append(counters["stats"]["unique_graphs"])


def train(config, prepared, device: torch.device, warmup: int, tmp: Path) -> dict[str, float | str]:
    counters.clear()
    module = Seq2SeqModule(config, prepared.tokenizers)
    datamodule = datamodule_for(config, module, prepared, None)
    datamodule.setup("fit")
    trainer = fit_trainer(config, tmp / f"run-{config.model.compile}")
    times = Graphs()
    trainer.callbacks.append(times)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=datamodule)
    batch = next(iter(datamodule.train_dataloader())).to(device)
    # Graphs compiled after the first step's: shapes the first graphs did not cover
    recompiles = counters["stats"]["unique_graphs"] - times.graphs[1]
    return {"tokens/s": steady(times.starts, times.tokens, warmup), "flops/token": flops_per_token(module, batch),
            "memory": peak_memory(device), "recompiles": recompiles, "module": module}


def decode(module: Seq2SeqModule, sources: list[str], beam: int) -> tuple[float, float]:
    """Sentences/s and output tokens/s."""
    translator = Translator(module, 64).with_decoding(beam=beam)
    translator.translate(sources[:64])  # warm-up
    sync(module.device)
    started = time.perf_counter()
    outputs = translator.tokens(sources)
    sync(module.device)
    seconds = time.perf_counter() - started
    return len(sources) / seconds, sum(map(len, outputs)) / seconds


def reorder_syncs(module: Seq2SeqModule) -> str:
    """Whether the beam search's cache reorder waits on the host (CUDA only: the CPU path may, by design)."""
    if module.device.type != "cuda":
        return "n/a (CPU: the reorder copies only the rows that move, which it finds on the host)"
    model = module.model
    src = torch.randint(4, 100, (8, 20), device=module.device)
    keep = torch.ones_like(src, dtype=torch.bool)
    state = model.start_decoding(model.encode(src, keep), keep, 16)
    model.decode_step(torch.ones(8, dtype=torch.long, device=module.device), state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        state.reorder(torch.tensor([1, 0, 2, 3, 5, 4, 6, 7], device=module.device))
    except RuntimeError as err:
        return f"SYNCS: {err}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return "no host sync"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="the CPU fallback even where a GPU is")
    parser.add_argument("--steps", type=int, default=None, help="training steps (GPU 120, CPU 12)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (GPU 20, CPU 3)")
    args, overrides = parser.parse_known_args()
    gpu = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if gpu else "cpu")
    steps, warmup = args.steps or (120 if gpu else 12), args.warmup or (20 if gpu else 3)
    base = (["experiment=translate_ko_en", "model=base", "trainer.accelerator=gpu", "trainer.devices=1",
             "trainer.precision=bf16-mixed"] if gpu else
            ["experiment=reverse", "model=tiny", "data.n_train=2048", "trainer.accelerator=cpu",
             "trainer.precision=32-true"])
    common = [*base, f"trainer.max_steps={steps}", "trainer.max_time=null", "trainer.max_epochs=-1",
              "trainer.limit_val_batches=0", "trainer.limit_test_batches=0", "trainer.num_sanity_val_steps=0",
              "monitor.patience=null", "optim.ema_decay=null", "trainer.enable_progress_bar=false", *overrides]
    dtype = torch.bfloat16 if gpu else torch.float32
    rate = matmul_rate(device, dtype)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    nominal = next((peak for key, peak in NOMINAL_BF16.items() if key in name), None) if gpu else None
    print(f"{name}: {str(dtype).removeprefix('torch.')} matmul {rate / 1e12:.1f} TFLOP/s measured"
          + (f", {nominal / 1e12:.0f} nominal" if nominal else "") + f"; {' '.join(common)}", flush=True)
    rows, trained = [], None
    with tempfile.TemporaryDirectory() as scratch:
        config = compose(common)
        L.seed_everything(config.seed)
        prepared = obtain(config, DATASETS.build(config.data, "data"), Path(scratch) / "prepared")
        for compiled in (False, True):
            result = train(compose([*common, f"model.compile={str(compiled).lower()}"]), prepared, device, warmup,
                           Path(scratch))
            flops = result["tokens/s"] * result["flops/token"]
            mfu = f"{flops / rate:.1%}" + (f" ({flops / nominal:.1%} nominal)" if nominal else "")
            rows.append(f"| train, {'compiled' if compiled else 'eager'} | {result['tokens/s']:.0f} target tok/s | "
                        f"MFU {mfu} | {result['memory']} | {result['recompiles']} recompiles |")
            trained = trained or result
        module = trained["module"].to(device).eval()
        reader = DATASETS.build(config.data, "data")
        sources = [src for rows_ in reader.stream(("val",)) for src, _ in rows_.pairs][:512]
        for beam in (1, 4):
            sentences, tokens = decode(module, sources, beam)
            rows.append(f"| decode, {'greedy' if beam == 1 else f'beam {beam}'} | {tokens:.0f} output tok/s | "
                        f"{sentences:.1f} sentences/s | {len(sources)} sentences | |")
        rows.append(f"| beam cache reorder | {reorder_syncs(module)} | | | |")
    print("| what | throughput | | memory / size | |\n|---|---|---|---|---|")
    print("\n".join(rows))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
