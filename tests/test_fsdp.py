"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on the CPU: 2 gloo ranks train the core as data parallel training
(gradients averaged over the ranks) does."""

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.fsdp import fully_shard

from seq2seq.data import IGNORE_INDEX, Batch
from seq2seq.module import sequence_loss
from seq2seq.testing import random_batch, tiny_model

pytestmark = pytest.mark.slow  # two processes
STEPS = 3


def _batch(rank: int, step: int) -> Batch:
    src, src_keep, tgt, tgt_keep = random_batch(100 * rank + step, 9, 7)
    tgt_in = torch.cat([torch.ones_like(tgt[:, :1]), tgt[:, :-1]], 1)
    return Batch(src, src_keep, tgt_in, tgt.masked_fill(~tgt_keep, IGNORE_INDEX))


def _train(rank: int, world: int, port: int, strategy: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = tiny_model(dropout=0.1).train()
    if strategy == "fsdp2":  # each layer its own group, the rest (embeddings, tied head, norms) the root's
        for layer in [*model.encoder, *model.decoder]:
            fully_shard(layer)
        wrapped = fully_shard(model)
        w = model.encoder[0].ff.w1.weight  # (d_ff, d_model), rows split over the ranks
        assert w.to_local().shape[0] == w.full_tensor().shape[0] // world
    else:
        wrapped = model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(STEPS):
        torch.manual_seed(step)  # the same dropout masks under both strategies
        loss = sequence_loss(wrapped, _batch(rank, step))
        opt.zero_grad()
        loss.backward()
        if strategy == "ddp":  # data parallel's rule, written out: every rank steps on the mean gradient
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        dist.all_reduce(total := loss.detach().clone())
        losses.append(total.item() / world)
    weights = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for name, p in model.named_parameters()}
    if rank == 0:
        torch.save((losses, weights), out)
    dist.barrier()
    dist.destroy_process_group()


def _run(strategy: str, tmp_path) -> tuple[list[float], dict[str, torch.Tensor]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / f"{strategy}.pt"
    ranks = mp.start_processes(_train, args=(2, port, strategy, str(out)), nprocs=2, join=False,
                               start_method="spawn")
    deadline = time.monotonic() + 300
    while not ranks.join(timeout=5):  # raises if a rank failed
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            pytest.fail(f"the {strategy} ranks did not finish in 300 s")
    return torch.load(out, weights_only=True)


def test_fsdp2_on_two_cpu_ranks_trains_as_data_parallel_does(tmp_path):
    """Sharded parameters, gradients reduce-scattered, optimizer steps on shards: after 3 AdamW steps the losses
    and the gathered weights equal data parallel training's to 1e-6 (the reductions may sum in another order)."""
    (ddp_losses, ddp_weights), (fsdp_losses, fsdp_weights) = _run("ddp", tmp_path), _run("fsdp2", tmp_path)
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-6)
    assert ddp_losses[-1] < ddp_losses[0]
    assert fsdp_weights.keys() == ddp_weights.keys()
    for name, weight in ddp_weights.items():
        torch.testing.assert_close(fsdp_weights[name], weight, rtol=1e-6, atol=1e-6, msg=name)
    changed = [name for name, w in ddp_weights.items() if not torch.equal(w, tiny_model().state_dict()[name])]
    assert len(changed) == len(ddp_weights)  # every weight trained, so every shard's update was compared
