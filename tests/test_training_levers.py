"""Training levers: the precision chosen for the hardware, activation checkpointing, compiled layers."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from seq2seq.config import resolve_precision
from seq2seq.data import IGNORE_INDEX, Batch
from seq2seq.model import Dropout
from seq2seq.module import sequence_loss
from seq2seq.schemas import TrainerSpec
from seq2seq.testing import random_batch, tiny_model
from seq2seq.trainer import build_trainer


def _cpu(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("avx512_bf16", "amx", "chosen"), [(True, False, "32-true"), (False, True, "bf16-mixed"),
                                                             (False, False, "32-true")])
def test_auto_precision_is_bf16_mixed_only_where_the_cpu_has_amx(monkeypatch, avx512_bf16, amx, chosen):
    _cpu(monkeypatch, avx512_bf16, amx)
    assert resolve_precision(TrainerSpec())[0] == chosen
    assert resolve_precision(TrainerSpec(accelerator="cpu"))[0] == chosen
    for explicit in ("32-true", "bf16-mixed", "64-true"):  # an explicit precision always wins
        assert resolve_precision(TrainerSpec(precision=explicit)) == (explicit, "trainer.precision")


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_on_a_gpu_takes_bf16_from_ampere_on(monkeypatch, native):
    _cpu(monkeypatch, avx512_bf16=True, amx=True)  # the CPU's features do not decide for a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda: (8, 0) if native else (7, 5))  # A100 / T4
    want = "bf16-mixed" if native else "32-true"
    assert resolve_precision(TrainerSpec())[0] == want
    assert resolve_precision(TrainerSpec(accelerator="gpu"))[0] == want
    assert resolve_precision(TrainerSpec(accelerator="mps"))[0] == "32-true"


def test_the_trainer_runs_in_the_chosen_precision_and_logs_why(monkeypatch, tmp_path, caplog):
    _cpu(monkeypatch, avx512_bf16=False, amx=True)
    with caplog.at_level(logging.INFO, logger="seq2seq"):
        assert build_trainer(TrainerSpec(), tmp_path, [], False).precision == "bf16-mixed"
        assert build_trainer(TrainerSpec(precision="32-true"), tmp_path, [], False).precision == "32-true"
    assert "precision bf16-mixed (auto: the device computes bf16 faster than fp32" in caplog.text
    assert "precision 32-true (trainer.precision)" in caplog.text


def _batch(seed: int, S: int, T: int) -> Batch:
    src, src_keep, tgt, tgt_keep = random_batch(seed, S, T)
    tgt_out = tgt.masked_fill(~tgt_keep, IGNORE_INDEX)
    return Batch(src, src_keep, torch.cat([torch.ones_like(tgt[:, :1]), tgt[:, :-1]], 1), tgt_out)


def _gradients(model, batch: Batch) -> dict[str, torch.Tensor]:
    model.zero_grad()
    torch.manual_seed(7)  # the same dropout masks in both runs
    sequence_loss(model, batch).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_checkpointed_activations_give_the_same_gradients():
    spec = {"dropout": 0.2, "attention_dropout": 0.1, "activation_dropout": 0.1}
    plain, checkpointed = tiny_model(**spec).train(), tiny_model(checkpoint_activations=True, **spec).train()
    batch = _batch(3, 9, 7)
    want, got = _gradients(plain, batch), _gradients(checkpointed, batch)
    assert want.keys() == got.keys() and len(want) == len(list(plain.parameters()))
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    # and it does recompute: the backward pass runs each layer's forward again
    calls = []
    for layer in checkpointed.encoder:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))
    _gradients(checkpointed, batch)
    assert len(calls) == 2 * len(checkpointed.encoder)


def test_compiled_layers_train_like_eager_and_do_not_recompile_across_batch_shapes():
    """Five AdamW steps on batches of different sizes and lengths: the compiled model's losses follow the eager
    model's to 1e-4 (dropout off: compiled dropout draws other masks), and after the first batch no batch shape
    compiles a new graph."""
    shapes = [(0, 12, 9), (1, 16, 16), (2, 8, 24), (3, 20, 5), (4, 13, 11), (5, 24, 8)]
    batches = [_batch(seed, S, T) for seed, S, T in shapes]
    batches[2] = Batch(*(t[:3] for t in (batches[2].src, batches[2].src_keep, batches[2].tgt_in, batches[2].tgt_out)))
    losses = {}
    for compiled in (False, True):
        model = tiny_model().train()
        if compiled:
            model.compile_layers()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[compiled] = []
        for i, batch in enumerate(batches):
            loss = sequence_loss(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[compiled].append(loss.item())
            if compiled and i == 0:
                graphs = counters["stats"]["unique_graphs"]
        if compiled:
            assert counters["stats"]["unique_graphs"] == graphs, "a batch shape compiled a new graph"
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    assert losses[False][-1] < losses[False][0]


def test_cpu_dropout_drops_at_its_rate_scales_the_rest_and_backpropagates_through_its_mask():
    drop = Dropout(0.3).train()
    x = torch.ones(1000, 1001, requires_grad=True)
    torch.manual_seed(0)
    y = drop(x)
    kept = y != 0
    assert kept.float().mean().item() == pytest.approx(0.7, abs=2e-3)
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d(sum y)/dx = mask / (1 - p)
    torch.manual_seed(0)
    assert torch.equal(drop(x), y)  # drawn from torch's generator: seeded, and resumed with its state
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))
