import subprocess
import sys
from importlib import resources

import pytest

from seq2seq.config import compose, prepare_overrides
from seq2seq.errors import ConfigError
from seq2seq.module import Seq2SeqModule, fit_tokenizers
from seq2seq.registry import DATASETS


def _options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("seq2seq_conf") / group).iterdir() if p.name.endswith(".yaml"))


EXPERIMENTS = _options("experiment")


def _module(config: dict) -> Seq2SeqModule:
    reader = DATASETS.build(config["data"], "data")
    return Seq2SeqModule(config, fit_tokenizers(config, reader.read("train").pairs[:200]))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_a_model_that_runs(experiment):
    config = compose([f"experiment={experiment}"])
    module = _module(config)
    source = DATASETS.build(config["data"], "data").read("val").pairs[0][0]
    assert len(module.predict([source])) == 1
    assert isinstance(config["model"], dict) and "DictConfig" not in repr(type(config["model"]))


@pytest.mark.parametrize("preset", _options("model"))
def test_every_model_preset_builds(preset):
    module = _module(compose([f"model={preset}"]))
    assert module.model.spec.d_model == compose([f"model={preset}"])["model"]["d_model"]


def test_base_preset_is_the_papers_model():
    model = compose(["model=base"])["model"]
    assert (model["d_model"], model["n_heads"], model["n_encoder_layers"], model["n_decoder_layers"],
            model["d_ff"], model["dropout"]) == (512, 8, 6, 6, 2048, 0.1)


def test_overrides_reach_the_built_model():
    config = compose(["experiment=reverse", "model.d_model=48", "model.n_heads=3", "model.norm_first=true"])
    module = _module(config)
    assert module.model.spec.d_model == 48 and module.model.spec.norm_first
    assert module.model.encoder[0].self_attn.n_heads == 3


@pytest.mark.parametrize(("overrides", "message"), [
    (["+typo=1"], r"unknown config key `typo`"),
    (["+model.d_modle=5"], r"`model\.d_modle`\. Did you mean `d_model`\?"),
    (["+trainer.max_epoch=2"], r"Did you mean `max_epochs`"),
    (["head.name=nope"], r"unknown head `nope`.*Registered heads: linear"),
    (["+data.taks=copy"], r"`data\.taks`.*Did you mean `task`"),
    (["trainer.precision=16-mixed", "trainer.accelerator=cpu"], r"bf16-mixed"),
    (["model.n_heads=5"], r"divisible"),
    (["plugins=[no_such_plugin]"], r"plugin module `no_such_plugin`.*failed to import"),
])
def test_bad_config_is_rejected_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_misspelt_override_keys_get_a_hint_before_hydra_composes():
    with pytest.raises(ConfigError, match=r"`model\.d_modle`\. Did you mean `d_model`"):
        prepare_overrides(["model.d_modle=5"])
    kept = ["model.d_model=5", "model=tiny", "+anything=1", "hydra.run.dir=x", "--cfg", "job"]
    assert prepare_overrides(kept) == kept


def test_plugin_options_left_at_their_defaults_are_still_overridable():
    assert prepare_overrides(["data.n_val=64", "head.bias=true"]) == ["++data.n_val=64", "++head.bias=true"]
    config = compose(["experiment=copy", "data.n_val=64", "head.bias=true"])
    assert config["data"]["n_val"] == 64 and config["head"]["bias"] is True
    with pytest.raises(ConfigError, match=r"`data\.n_vall`.*Did you mean `n_val`"):
        compose(["experiment=copy", "data.n_vall=64"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from seq2seq.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("override", "message"), [
    ("+typo=1", "unknown config key `typo`"),
    ("model.d_modle=5", "Did you mean `d_model`"),
])
def test_the_cli_exits_non_zero_on_a_bad_key_before_any_work(override, message, tmp_path):
    result = _cli("train", "experiment=reverse", override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_prints_the_composed_config():
    result = _cli("train", "experiment=sort", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "task: sort" in result.stdout and "d_model: 64" in result.stdout


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr("seq2seq.config.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'seq2seq\[tensorboard\]'"):
        compose(["loggers=[csv,tensorboard]"])


def test_wrong_types_are_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"`data\.n_val` must be"):
        compose(["experiment=copy", "data.n_val=many"])
    with pytest.raises(Exception, match=r"model\.d_model"):  # Hydra's own type check on schema keys
        compose(["model.d_model=wide"])
