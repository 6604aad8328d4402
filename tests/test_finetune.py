"""Starting from a checkpoint (`init=`): full fine-tuning and LoRA adapters, resumed exactly, merged for inference,
export and averaging; what `init` refuses."""

import pytest
import torch

from seq2seq import compose, train
from seq2seq.checkpoints import read_checkpoint
from seq2seq.errors import ConfigError
from seq2seq.lora import LoRASpec, add_adapters, merge
from seq2seq.module import Seq2SeqModule
from seq2seq.testing import tiny_model
from seq2seq.warmstart import from_init

BASE = ["experiment=reverse", "model=tiny", "data.n_train=256", "data.n_val=16", "data.n_test=16",
        "loader.max_tokens=256", "trainer.max_epochs=-1", "monitor.patience=null", "trainer.enable_progress_bar=false",
        "save_every_n_steps=1"]
ADAPTERS = ".parametrizations.weight.0."


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny reverse-task model after 12 steps: the checkpoint runs start from."""
    run_dir = tmp_path_factory.mktemp("base")
    train(compose([*BASE, "trainer.max_steps=12"]), run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def _state(path):
    return read_checkpoint(path)["state_dict"]


def test_merged_adapters_compute_what_the_adapted_model_does():
    model = tiny_model(seed=3)
    add_adapters(model, LoRASpec(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ADAPTERS in name:
                p.normal_()  # B starts at zero: make the adapters do something
    src = torch.randint(4, 20, (3, 7))
    keep = torch.ones_like(src, dtype=torch.bool)
    tgt = torch.randint(4, 20, (3, 5))
    model.eval()
    adapted = model(src, keep, tgt, torch.ones_like(tgt, dtype=torch.bool))
    plain = tiny_model(seed=3).eval()
    assert not torch.allclose(adapted, plain(src, keep, tgt, torch.ones_like(tgt, dtype=torch.bool)), atol=1e-2)
    merge(model)
    assert not any("parametrizations" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(model(src, keep, tgt, torch.ones_like(tgt, dtype=torch.bool)), adapted, atol=1e-5,
                               rtol=1e-5)


def test_lora_trains_adapters_only_checkpoints_them_alone_and_resumes_exactly(base, tmp_path):
    lora = [*BASE, f"init={base}", "model.lora.rank=4", "optim.lr=3.0"]
    straight = train(compose([*lora, "trainer.max_steps=8"]), tmp_path / "straight")
    frozen = {k.removeprefix("model."): v for k, v in _state(base).items() if k.startswith("model.")}
    for name, value in straight.model.state_dict().items():  # the base, untouched; the adapters, moved
        if name.endswith(".original"):
            assert torch.equal(value, frozen[name.replace(".parametrizations.weight.original", ".weight")])
    ckpt = _state(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert ckpt and all(ADAPTERS in name for name in ckpt)  # small: adapters and nothing frozen
    assert any(v.abs().sum() > 0 for k, v in ckpt.items() if k.endswith(".b"))
    trainable = sum(p.numel() for p in straight.model.parameters() if p.requires_grad)
    assert trainable == sum(v.numel() for v in ckpt.values())

    train(compose([*lora, "trainer.max_steps=3"]), tmp_path / "stopped")
    train(compose([*lora, "trainer.max_steps=8", f"resume={tmp_path / 'stopped'}"]), tmp_path / "stopped")
    resumed = _state(tmp_path / "stopped" / "checkpoints" / "last.ckpt")
    assert resumed.keys() == ckpt.keys() and all(torch.equal(resumed[k], ckpt[k]) for k in ckpt)

    # Loaded for inference: the base from `init`, the adapters over it, merged into an ordinary model.
    module = Seq2SeqModule.from_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    assert module.config.model.lora.rank == 0 and not any("parametrizations" in k for k in module.state_dict())
    merge(straight.model)
    for name, value in straight.model.state_dict().items():
        torch.testing.assert_close(module.model.state_dict()[name], value)


def test_full_fine_tuning_starts_from_the_checkpoint_and_keeps_its_tokenizers(base, tmp_path):
    module = train(compose([*BASE, f"init={base}", "trainer.max_steps=1", "optim.lr=1e-9"]), tmp_path)
    start = _state(base)
    assert all(torch.allclose(module.state_dict()[k], v, atol=1e-6) for k, v in start.items() if k.startswith("model."))
    assert module.hparams["tokenizers"] == read_checkpoint(base)["hyper_parameters"]["tokenizers"]


def test_init_refuses_an_architecture_the_command_line_changes_and_lora_needs_a_base(base):
    config = compose([*BASE, f"init={base}"])
    width = read_checkpoint(base)["hyper_parameters"]["config"]["model"]["d_model"]
    with pytest.raises(ConfigError, match=rf"`model.d_model={2 * width}` \(the checkpoint's is {width}\)"):
        from_init(config, ["experiment=reverse", f"model.d_model={2 * width}", f"init={base}"])
    started, _, _ = from_init(config, ["model.dropout=0.3", f"model.d_model={width}"])  # agreeing, or no shape
    assert started.model.d_model == width
    for extra, message in ((["model.lora.rank=4"], "give it with `init=CKPT`"),
                           ([f"init={base}", "model.lora.rank=4", "optim.ema_decay=0.99"], "optim.ema_decay=null"),
                           ([f"init={base}", "model.lora.rank=4", "average_last=2"], "average the checkpoints")):
        with pytest.raises(ConfigError, match=message):
            compose([*BASE, *extra])


def test_averaging_lora_checkpoints_averages_the_merged_models(base, tmp_path):
    from seq2seq.inference import average
    from seq2seq.schemas import AverageConfig

    for steps in (2, 4):
        train(compose([*BASE, f"init={base}", "model.lora.rank=4", "optim.lr=3.0", f"trainer.max_steps={steps}"]),
              tmp_path / f"run{steps}")
    ckpts = [tmp_path / f"run{steps}" / "checkpoints" / "last.ckpt" for steps in (2, 4)]
    average(AverageConfig(ckpts=[str(p) for p in ckpts], output=str(tmp_path / "mean.ckpt")))
    merged = [Seq2SeqModule.from_checkpoint(p).state_dict() for p in ckpts]
    mean = read_checkpoint(tmp_path / "mean.ckpt")
    assert mean["hyper_parameters"]["config"]["model"]["lora"]["rank"] == 0
    for name, value in mean["state_dict"].items():
        torch.testing.assert_close(value, (merged[0][name] + merged[1][name]) / 2)
    gap = merged[0]["model.encoder.0.ff.w1.weight"] - merged[1]["model.encoder.0.ff.w1.weight"]
    assert gap.abs().max() > 1e-6  # two different fine-tunings: the mean is not either of them
    average(AverageConfig(ckpts=[str(ckpts[0])], output=str(tmp_path / "one.ckpt")))  # one alone: merged
    one = Seq2SeqModule.from_checkpoint(tmp_path / "one.ckpt").state_dict()
    assert all(torch.equal(one[k], merged[0][k]) for k in one)
