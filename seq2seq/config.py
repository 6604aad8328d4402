"""Config flow: Hydra composes `conf/<command>.yaml` -> `validate` -> a frozen dataclass tree of the command's
schema (`seq2seq.schemas`). Plugin blocks (`data`, `tokenizer`, `embedding`, `head`, `metrics`) are checked against
the registered constructors' signatures. `validate` reports every mistake of a config at once, before any data are read.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from seq2seq import metrics  # noqa: F401 - registers the core's metric
from seq2seq.decoding import DecodeSpec
from seq2seq.errors import ConfigError
from seq2seq.launch import preflight
from seq2seq.plugins import import_plugins, search_path, searchpath_override, trust
from seq2seq.registry import DATASETS, EMBEDDINGS, HEADS, METRICS, TOKENIZERS
from seq2seq.schema import build, describe, field_type, hint, join, to_data
from seq2seq.schemas import (
    INFERENCE_GROUPS,
    LOGGERS,
    REQUIRED,
    SCHEMAS,
    TRAINING,
    TrainConfig,
    TrainerSpec,
    owners,
)


def _groups() -> dict[str, list[str]]:
    """Config group -> its options, from `conf/` and the announced plugins' config folders."""
    folders = [resources.files("seq2seq_conf")] + [Path(p.removeprefix("file://")) for p in search_path()]
    found: dict[str, list[str]] = {}
    for folder in folders:
        for group in folder.iterdir():
            if group.is_dir() and not group.name.startswith(("_", ".")) and group.name != "hydra":
                names = (p.name.removesuffix(".yaml") for p in group.iterdir() if p.name.endswith(".yaml"))
                found.setdefault(group.name, []).extend(names)
    return found


def prepare_overrides(overrides: list[str] | tuple[str, ...], command: str = "train") -> list[str]:
    """Check command-line overrides against the command's schema and config groups before Hydra composes; return
    them ready for Hydra.

    A misspelt key fails here with the key that was meant, and an unknown group option with the options there are.
    A key inside a plugin block (`data.n_val=64`) becomes Hydra's add-or-override form (`++data.n_val=64`): a
    plugin's options are its constructor's keyword arguments, and those its YAML leaves at their defaults are still
    settable; the registry checks them after composition. So does a mapping setting (`optim.token_weights={1: 8}`,
    `optim.token_weights.1=8`). Additions, deletions and `hydra.*` keys pass unchanged.
    """
    parser = OverridesParser.create()
    schema_root, groups = SCHEMAS[command], _groups()
    if command not in TRAINING:  # `conf/<command>.yaml` composes only these groups
        groups = {g: groups[g] for g in INFERENCE_GROUPS[command]}
    prepared = []
    for text in overrides:
        if text.startswith("-") or "=" not in text:
            prepared.append(text)
            continue
        override = parser.parse_override(text)
        key = override.key_or_group
        if key.startswith("hydra") or override.is_add() or override.is_delete() or override.is_force_add():
            prepared.append(text)
            continue
        if key in groups:  # a group choice (`model=tiny`, `experiment=reverse`)
            value = str(override.value())
            if not override.is_sweep_override() and value not in groups[key] and value != "null":
                raise ConfigError(f"unknown {key} `{value}`.{hint(value, groups[key])} "
                                  f"Available: {', '.join(sorted(groups[key]))}")
            prepared.append(text)
            continue
        in_plugin_block = _check_key(schema_root, key, command, override.value())
        prepared.append("++" + text if in_plugin_block else text)
    return prepared


def _check_key(schema_root: type, key: str, command: str, value: Any) -> bool:
    """Check a key against the schema; True when it lies inside a plugin block (its constructor checks it)."""
    parts = key.split(".")
    schema: Any = schema_root
    for depth, part in enumerate(parts):
        if not dataclasses.is_dataclass(schema):
            return True
        others = owners(part) if depth == 0 and part not in {f.name for f in dataclasses.fields(schema)} else []
        if others:
            listed = ", ".join(others[:-1]) + (" and " if len(others) > 1 else "") + others[-1]
            raise ConfigError(f"`{part}` is an option of `seq2seq {listed}`, not of `seq2seq {command}`"
                              + ("; validation decoding follows `decode.*`"
                                 if command in TRAINING and part in DecodeSpec.__dataclass_fields__ else ""))
        schema = field_type(schema, part, ".".join(parts[:depth]))
    if isinstance(value, dict) and type(None) in typing.get_args(schema):
        # OmegaConf cannot merge a block into a node that composed to null.
        raise ConfigError(f"`{key}` cannot be given as a block on the command line; choose a config group option "
                          "that defines it (e.g. `tokenizer=bpe_separate` for separate vocabularies), then override "
                          "its keys")
    return typing.get_origin(schema) is dict  # a mapping setting takes keys its default lacks


def _length_problems(decode: DecodeSpec, length: int | None) -> list[str]:
    """A reader whose targets all have one length (a label per step of a horizon) against the decoding length."""
    if length is None or (decode.max_len_a == 0 and decode.max_len_b == length):
        return []
    return [f"the reader's targets are {length} labels long (e.g. `data.horizon`), but `decode.max_len_a="
            f"{decode.max_len_a}` and `decode.max_len_b={decode.max_len_b}` decode another length; set "
            f"`decode.max_len_a=0 decode.max_len_b={length}`"]


def _component_problems(config: TrainConfig) -> list[str]:
    """Each plugin block against its constructor's signature, then built, so that the constructor's own checks of
    its values run too (constructors check their options and read nothing)."""
    context = ("d_model", "vocab_size", "padding_idx", "n_features")
    checks = [(DATASETS, config.data, (), "data"), (TOKENIZERS, config.tokenizer.src, (), "tokenizer.src"),
              (EMBEDDINGS, config.embedding.src, context, "embedding.src"),
              (HEADS, config.head, ("d_model", "vocab_size"), "head")]
    if config.tokenizer.tgt is not None:
        checks.append((TOKENIZERS, config.tokenizer.tgt, (), "tokenizer.tgt"))
    problems = []
    if not config.model.share_embeddings:
        if config.embedding.tgt is None:
            problems.append("`embedding.tgt` is null but `model.share_embeddings` is false: give the target "
                            "embedding, e.g. `embedding.tgt={name: token}`")
        else:
            checks.append((EMBEDDINGS, config.embedding.tgt, context, "embedding.tgt"))
    elif config.tokenizer.tgt is not None:
        problems.append("`model.share_embeddings=true` needs one joint vocabulary: set `tokenizer.tgt` to null, or "
                        "set `model.share_embeddings=false`")
    checks += [(METRICS, {"name": name}, ("tokenizer",), "metrics") for name in config.metrics]
    for registry, spec, ctx, where in checks:
        try:
            registry.check(spec, ctx, where)
            if not ctx:  # readers and tokenizers need no framework values to be built
                built = registry.build(spec, where)
                if registry is DATASETS:
                    problems += _length_problems(config.decode, built.target_length())
        except ConfigError as err:
            problems.append(str(err))
    return problems


def fast_bf16(accelerator: str) -> bool:
    """Whether the device an accelerator setting resolves to computes bf16 faster than fp32."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8  # Ampere and later
    if accelerator not in ("cpu", "auto"):
        return False  # mps, tpu, ...: the precision is the user's to choose
    # Only AMX's tile units make bf16 matmuls faster than fp32: AVX512-BF16 alone computes them at about half the
    # fp32 speed (docs/configuration.md, "Precision", has the figures). torch.cpu's feature query is private.
    query = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return query is not None and query()


def resolve_precision(trainer: TrainerSpec) -> tuple[str, str]:
    """`trainer.precision`, with auto chosen for the hardware; and why, for the log."""
    if trainer.precision != "auto":
        return trainer.precision, "trainer.precision"
    if fast_bf16(trainer.accelerator):
        return "bf16-mixed", "auto: the device computes bf16 faster than fp32; trainer.precision=32-true to override"
    return "32-true", ("auto: the device computes bf16 no faster than fp32 (a GPU before Ampere, a CPU without AMX); "
                       "trainer.precision=bf16-mixed to override")


def _available_memory(accelerator: str) -> int | None:
    """Bytes the run's device may hold: a CUDA GPU's memory, or the memory Linux says is available; None if unknown."""
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.cuda.mem_get_info()[1] if torch.cuda.is_available() else None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    return int(found.group(1)) * 1024 if found else None


def _memory_problem(config: TrainConfig) -> str | None:
    """Whether the model's layers alone (no embeddings, no activations) fit the device: fp32 weights, gradients and
    Adam's two moments, 16 bytes a parameter. A lower bound, checked before anything is built."""
    m = config.model
    params = (m.n_encoder_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff)
              + m.n_decoder_layers * (8 * m.d_model**2 + 2 * m.d_model * m.d_ff))
    available = _available_memory(config.trainer.accelerator)
    if available is None or 16 * params <= available:
        return None
    return (f"the model's layers alone have {params / 1e6:,.0f}M parameters, which with their gradients and "
            f"optimizer state need at least {16 * params / 2**30:,.1f} GiB, and the device has "
            f"{available / 2**30:,.1f} GiB available; lower `model.d_model`, `model.d_ff` or the layer counts")


def _lora_problems(config: TrainConfig) -> list[str]:
    """Adapters train over a frozen model that a checkpoint gives; averages of adapters are not averages of the
    models they make."""
    problems = []
    if config.init is None:
        problems.append("`model.lora.rank` trains adapters over a pretrained model: give it with `init=CKPT`")
    if config.optim.ema_decay is not None:
        problems.append("`optim.ema_decay` keeps an average of every weight, frozen ones included; with LoRA set "
                        "`optim.ema_decay=null`")
    if config.average_last is not None:
        problems.append("`average_last` averages adapters factor by factor, which is not the average of the models; "
                        "with LoRA leave it out and average the checkpoints afterwards (`seq2seq average` merges "
                        "the adapters first)")
    return problems


def _fsdp_problems(config: TrainConfig) -> list[str]:
    """What `trainer=fsdp` (`seq2seq.sharding`) cannot do yet, each with what to do instead."""
    problems = []
    if config.optim.ema_decay is not None:
        problems.append("`trainer=fsdp` keeps no EMA of sharded weights: set `optim.ema_decay=null` (or average "
                        "the last checkpoints with `average_last`)")
    if config.model.lora.rank:
        problems.append("`trainer=fsdp` does not shard LoRA adapters: fine-tune with LoRA under `trainer=ddp`")
    if config.trainer.precision in ("16-mixed", "16", "transformer-engine", "transformer-engine-float16"):
        problems.append(f"`trainer=fsdp` runs in bf16-mixed (bf16 weights in compute, fp32 gradient reduction), "
                        f"bf16-true or 32-true, not `trainer.precision={config.trainer.precision}`")
    return problems


def _train_problems(config: TrainConfig) -> list[str]:
    trainer, monitor, problems = config.trainer, config.monitor, []
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and trainer.precision in ("16-mixed", "16", "16-true"):
        problems.append(f"`trainer.precision={trainer.precision}` needs a GPU, and this run is on the CPU; "
                        "use `trainer.precision=bf16-mixed` (or 32-true)")
    problems += preflight(trainer.devices, trainer.num_nodes)
    if trainer.strategy == "fsdp":
        problems += _fsdp_problems(config)
    elif trainer.strategy.startswith("fsdp"):
        problems.append(f"`trainer.strategy={trainer.strategy}`: sharded training is `trainer=fsdp` (FSDP2 through "
                        "Lightning's ModelParallelStrategy)")
    if (memory := _memory_problem(config)) is not None:
        problems.append(memory)
    if config.model.lora.rank:
        problems += _lora_problems(config)
    monitored = ["val/loss", *(f"val/{name}" for name in config.metrics if name in METRICS.names())]
    if monitor.metric not in monitored:
        problems.append(f"`monitor.metric={monitor.metric}` is not logged in validation."
                        f"{hint(monitor.metric, monitored)} Logged: {', '.join(monitored)} (from `metrics`)")
    unknown = sorted(set(config.loggers) - set(LOGGERS))
    if unknown:
        problems.append(f"`loggers` may hold {' and '.join(LOGGERS)}, got {unknown}")
    if "tensorboard" in config.loggers and not (find_spec("tensorboard") or find_spec("tensorboardX")):
        problems.append("`loggers` asks for tensorboard, which is not installed: "
                        "`pip install 'seq2seq[tensorboard]'`, or drop it from `loggers`")
    return problems


def _required_problems(data: dict[str, Any]) -> list[str]:
    return [f"`{key}` is required: add `{key}=...` to the command line"
            for key, value in data.items() if value == REQUIRED]


def validate(cfg: DictConfig | dict[str, Any], command: str = "train") -> Any:
    """Composed config -> the command's frozen schema instance; every mistake is reported at once (ConfigError)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(data, dict)
    config, problems = build(SCHEMAS[command], data)
    problems = _required_problems(data) + problems
    if command not in TRAINING and "plugins" in data:
        trust(list(config.plugins))  # what the user names, before a checkpoint asks for it
    if command in TRAINING:
        try:
            import_plugins(list(config.plugins))
            problems += _component_problems(config)
        except ConfigError as err:
            problems.append(str(err))
        problems += _train_problems(config)
    if problems:
        raise ConfigError(join(problems))
    return config


def load_train_config(data: dict[str, Any]) -> TrainConfig:
    """A stored training config (a checkpoint's) as the frozen tree. Its schema and components are checked; what
    concerns only the machine that trained it (GPU precision, installed loggers) is not."""
    config, problems = build(TrainConfig, data)
    if problems:
        raise ConfigError(join(problems))
    return config


def help_text(command: str) -> str:
    """`seq2seq <command> --help`: every key with its default and help."""
    schema = SCHEMAS[command]
    about = " ".join(schema.__doc__.split())
    lines = [f"usage: seq2seq {command} [key=value ...] [hydra options]", f"  {about}", "",
             "keys (key=default  help):"]
    lines += describe(schema)
    if command in TRAINING:
        lines += ["", "plugin blocks (data, tokenizer.*, embedding.*, head) take their component's constructor "
                  "options;",
                  "config groups: " + "; ".join(f"{g}={'|'.join(sorted(o))}" for g, o in sorted(_groups().items()))]
    return "\n".join(lines)


for _command, _schema in SCHEMAS.items():  # the composed tree starts from every key's one default
    ConfigStore.instance().store(name=f"{_command}_schema", node=to_data(_schema()))
# `conf/sweep/optuna.yaml` turns `monitor.mode` into the sweeper's direction.
OmegaConf.register_new_resolver("seq2seq.direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode],
                                replace=True)


def compose(overrides: list[str] | tuple[str, ...] = (), command: str = "train") -> Any:
    """Compose `conf/<command>.yaml` with command-line style overrides and validate it, without a Hydra app."""
    with hydra.initialize_config_module("seq2seq_conf", version_base="1.3"):
        composed = hydra.compose(command, overrides=[*prepare_overrides(overrides, command), *searchpath_override()])
    return validate(composed, command)
