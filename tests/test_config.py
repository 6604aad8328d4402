import dataclasses
import subprocess
import sys
from importlib import resources

import pytest
from conftest import cli

from seq2seq.build import fit_tokenizers
from seq2seq.config import compose, help_text, prepare_overrides
from seq2seq.errors import ConfigError
from seq2seq.module import Seq2SeqModule
from seq2seq.registry import DATASETS
from seq2seq.schemas import TrainConfig
from seq2seq.translate import Translator


def _options(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in (resources.files("seq2seq_conf") / group).iterdir() if p.name.endswith(".yaml"))


EXPERIMENTS = _options("experiment")


def _module(config: TrainConfig) -> Seq2SeqModule:
    reader = DATASETS.build(config.data, "data")
    return Seq2SeqModule(config, fit_tokenizers(config, reader.read("train").pairs[:200]))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_into_a_frozen_tree_and_builds_a_model_that_decodes(experiment):
    config = compose([f"experiment={experiment}"])
    module = _module(config).eval()
    sources = [s for s, _ in DATASETS.build(config.data, "data").read("val").pairs[:3]]
    outputs = Translator(module).tokens(sources)
    assert len(outputs) == 3 and all(isinstance(i, int) for ids in outputs for i in ids)
    never = {module.tgt_tok.bos_id, module.tgt_tok.pad_id}  # an untrained model would emit them if it could
    assert not never & {i for ids in outputs for i in ids}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model.d_model = 1  # type: ignore[misc]


@pytest.mark.parametrize("preset", _options("model"))
def test_every_model_preset_builds(preset):
    module = _module(compose([f"model={preset}"]))
    assert module.model.spec.d_model == compose([f"model={preset}"]).model.d_model


def test_base_preset_is_the_papers_model():
    model = compose(["model=base"]).model
    assert (model.d_model, model.n_heads, model.n_encoder_layers, model.n_decoder_layers, model.d_ff,
            model.dropout) == (512, 8, 6, 6, 2048, 0.1)


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
    (["experiment=translate_ko_en", "trainer=fsdp"], r"`trainer=fsdp` keeps no EMA.*optim.ema_decay=null"),
    (["trainer=fsdp", "trainer.precision=16-mixed"], r"`trainer=fsdp` runs in bf16-mixed"),
    (["trainer.strategy=fsdp_cpu_offload"], r"sharded training is `trainer=fsdp` \(FSDP2"),
    (["optim.ema_decay=1.5"], r"`optim\.ema_decay` must lie between 0 and 1"),
    (["average_last=1"], r"`average_last` must be at least 2"),
    (["model.n_heads=5"], r"divisible"),
    (["plugins=[no_such_plugin]"], r"plugin module `no_such_plugin`.*failed to import"),
    (["optim.lr=nan"], r"`optim\.lr` must be a finite number, got nan"),
    (["optim.lr=inf"], r"`optim\.lr` must be a finite number, got inf"),
    (["model.dropout=1.5"], r"`model\.dropout` must be at most 1, got 1\.5"),
    (["optim.label_smoothing=1.5"], r"`optim\.label_smoothing` must be at most 1, got 1\.5"),
    (["optim.betas=[2,3]"], r"`optim\.betas` must be at most 0\.9999, got \[2, 3\]"),
    (["optim.betas=[0.9]"], r"`optim\.betas` must be two numbers"),
    (["trainer.max_time=abc"], r"`trainer\.max_time` must be DD:HH:MM:SS .*got 'abc'"),
    (["trainer.val_check_interval=-1"], r"`trainer\.val_check_interval` must be .* got -1"),
    (["trainer.val_check_interval=1.5"], r"`trainer\.val_check_interval` must be .* got 1\.5"),
    (["trainer.max_steps=0"], r"`trainer\.max_steps=0` trains nothing"),
    (["model.d_model=100000000"], r"M parameters, which with their gradients and optimizer state need at least "
                                  r"[\d,.]+ GiB, and the device has [\d,.]+ GiB available"),
    (["model.block=x"], r"unknown config key `model\.block`\. Accepted keys under `model`: d_model, n_heads"),
    (["metrics=[blue]"], r"(?s)unknown metric `blue`(?!.*val/blue)"),
    (["experiment=typhoon_onset", "data.horizon=3"], r"targets are 3 labels long .* set `decode\.max_len_a=0 "
                                                     r"decode\.max_len_b=3`"),
    (["experiment=translate_ko_en", "tokenizer.src.vocab_size=0"], r"tokenizer `vocab_size` must be at least 8"),
])
def test_bad_config_is_rejected_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        compose(overrides)


def test_misspelt_override_keys_get_a_hint_before_hydra_composes():
    with pytest.raises(ConfigError, match=r"`model\.d_modle`\. Did you mean `d_model`"):
        prepare_overrides(["model.d_modle=5"])
    kept = ["model.d_model=5", "model=tiny", "+anything=1", "hydra.run.dir=x", "--cfg", "job"]
    assert prepare_overrides(kept) == kept
    with pytest.raises(ConfigError, match=r"unknown experiment `revers`\. Did you mean `reverse`\?"):
        prepare_overrides(["experiment=revers"])


def test_plugin_options_left_at_their_defaults_are_still_overridable():
    assert prepare_overrides(["data.n_val=64", "head.bias=true"]) == ["++data.n_val=64", "++head.bias=true"]
    config = compose(["experiment=copy", "data.n_val=64", "head.bias=true"])
    assert config.data["n_val"] == 64 and config.head["bias"] is True
    with pytest.raises(ConfigError, match=r"`data\.n_vall`.*Did you mean `n_val`"):
        compose(["experiment=copy", "data.n_vall=64"])


@pytest.mark.parametrize(("override", "message"), [
    ("+typo=1", "unknown config key `typo`"),
    ("model.d_modle=5", "Did you mean `d_model`"),
])
def test_the_cli_exits_non_zero_on_a_bad_key_before_any_work(override, message, tmp_path):
    result = cli("train", "experiment=reverse", override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_cli_prints_the_composed_config():
    result = cli("train", "experiment=sort", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "task: sort" in result.stdout and "d_model: 64" in result.stdout


def test_tensorboard_without_the_package_is_a_config_error(monkeypatch):
    monkeypatch.setattr("seq2seq.config.find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"pip install 'seq2seq\[tensorboard\]'"):
        compose(["loggers=[csv,tensorboard]"])


def test_wrong_types_are_rejected_naming_the_key():
    with pytest.raises(ConfigError, match=r"`data\.n_val` must be"):
        compose(["experiment=copy", "data.n_val=many"])
    with pytest.raises(ConfigError, match=r"`model\.d_model` must be int, got 'wide'"):
        compose(["model.d_model=wide"])


def test_every_mistake_of_a_config_is_reported_at_once_naming_key_value_and_accepted_values():
    with pytest.raises(ConfigError) as caught:
        compose(["experiment=reverse", "model.d_model=0", "decode.beam=0", "decode.length_normalization=foo",
                 "monitor.metric=val/exact_mach", "loader.batch_size=-1", "model.n_heads=0", "data.task=sorting"])
    message = str(caught.value)
    assert message.startswith("7 problems in the config")
    assert "`data.task` must be one of copy, reverse, sort, add, got 'sorting'" in message  # the reader's own check
    for expected in ("`model.d_model` must be at least 1, got 0", "`model.n_heads` must be at least 1, got 0",
                     "`decode.beam` must be at least 1, got 0",
                     "`decode.length_normalization` must be one of gnmt, average, got 'foo'",
                     "`monitor.metric=val/exact_mach` is not logged in validation. Did you mean `val/exact_match`?",
                     "`loader.batch_size` must be at least 1, got -1"):
        assert expected in message


def test_an_option_of_another_command_is_refused_naming_every_command_that_has_it():
    with pytest.raises(ConfigError, match=r"`beam` is an option of `seq2seq evaluate, predict, translate and serve`, "
                                          r"not of `seq2seq train`; validation decoding follows `decode\.\*`"):
        prepare_overrides(["beam=5"])
    with pytest.raises(ConfigError, match=r"`folds` is an option of `seq2seq backtest`, not of `seq2seq evaluate`"):
        prepare_overrides(["folds=3"], "evaluate")
    with pytest.raises(ConfigError, match=r"`force` is an option of `seq2seq .*`, not of `seq2seq serve`"):
        prepare_overrides(["force=true"], "serve")


def test_each_command_has_its_own_schema_with_required_keys():
    with pytest.raises(ConfigError, match=r"`ckpt` is required"):
        compose([], command="evaluate")
    with pytest.raises(ConfigError, match=r"unknown config key `experiment`.*Accepted keys: ckpt"):
        compose(["experiment=reverse", "ckpt=x.ckpt"], command="evaluate")
    config = compose(["ckpt=x.ckpt", "input=in.txt", "beam=4"], command="predict")
    assert (config.ckpt, config.input, config.beam, config.output) == ("x.ckpt", "in.txt", 4, None)


def test_help_lists_every_key_with_its_default_and_description():
    text = help_text("train")
    assert "model.d_model=512" in text and "width of every layer" in text
    assert "decode.length_normalization=gnmt" in text and "(one of gnmt, average)" in text
    assert "experiment=" in text and "reverse" in text
    assert "ckpt=???" in help_text("translate")


def _yaml_files() -> list[tuple[str, object]]:
    from omegaconf import OmegaConf

    folders = [resources.files("seq2seq_conf"), resources.files("seq2seq_g2p") / "conf"]
    return [(f"{folder.name}/{group.name}/{p.name}", OmegaConf.to_container(OmegaConf.load(str(p))) or {})
            for folder in folders for group in folder.iterdir() if group.is_dir() and group.name != "hydra"
            for p in group.iterdir() if p.name.endswith(".yaml")]


def _restated(block: dict, defaults: dict, where: str) -> list[str]:
    return [f"{where}.{k}" for k, v in block.items() if k in defaults and defaults[k] == v and k != "name"]


def test_no_yaml_value_restates_the_default_it_overrides():
    from seq2seq.plugins import import_announced
    from seq2seq.registry import EMBEDDINGS, HEADS, TOKENIZERS
    from seq2seq.schema import to_data
    from seq2seq.schemas import SCHEMAS

    import_announced()
    schema = to_data(SCHEMAS["train"]())
    registries = {"data": DATASETS, "head": HEADS}

    def constructor_defaults(registry, spec: dict) -> dict:
        import inspect

        params = inspect.signature(registry.get(spec["name"])).parameters
        return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}

    restated, checked = [], 0
    for name, tree in _yaml_files():
        group = name.split("/")[1]
        blocks = {group: tree} if group != "experiment" else tree  # experiments are global
        composed = compose([f"experiment={name.split('/')[2][:-5]}"]) if group == "experiment" else None
        for key, block in blocks.items():
            if key == "defaults" or not isinstance(block, dict):
                restated += [name] * (key in schema and key != "defaults" and schema[key] == block)
                continue
            checked += 1
            if key in ("tokenizer", "embedding"):
                for side, spec in block.items():
                    if isinstance(spec, dict) and "name" in spec:
                        registry = TOKENIZERS if key == "tokenizer" else EMBEDDINGS
                        restated += _restated(spec, constructor_defaults(registry, spec), f"{name}:{key}.{side}")
            elif key in registries:
                spec = block if "name" in block else (getattr(composed, key) if composed else block)
                restated += _restated(block, constructor_defaults(registries[key], spec), f"{name}:{key}")
            else:
                restated += _restated(block, schema.get(key, {}), f"{name}:{key}")
    assert checked > 20
    assert restated == []


@pytest.mark.slow  # a Python start
def test_composing_one_experiment_registers_no_other_plugins_components():
    script = ("import sys; from seq2seq import compose; from seq2seq.registry import TOKENIZERS; "
              "compose(['experiment=reverse']); "
              "assert 'seq2seq_g2p' not in sys.modules and 'graphemes' not in TOKENIZERS.names(), sys.modules.keys(); "
              "from seq2seq.errors import ConfigError\n"
              "try:\n compose(['experiment=g2p', 'plugins=[]'])\nexcept ConfigError as e:\n print(e)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "unknown tokenizer `graphemes`" in result.stdout
