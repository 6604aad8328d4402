"""Config flow: Hydra composes -> `validate` -> a plain dict for the LightningModule.

Fixed-shape groups have dataclass schemas (one default per field); plugin blocks (`data`, `tokenizer`,
`embedding`, `head`, `metrics`) are checked against the registered constructors' signatures. Unknown keys,
`+typo=...` additions included, are rejected with a close-match hint before any work starts.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from seq2seq.data import LoaderSpec
from seq2seq.decoding import DecodeSpec
from seq2seq.errors import ConfigError
from seq2seq.model import ModelSpec
from seq2seq.plugins import import_plugins, searchpath_override
from seq2seq.registry import DATASETS, EMBEDDINGS, HEADS, METRICS, TOKENIZERS, hint
from seq2seq.schedule import OptimSpec


@dataclass
class TrainerSpec:
    """Keyword arguments of `lightning.Trainer` that runs may set (the `trainer:` block)."""

    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    max_epochs: int = 10
    max_steps: int = -1
    max_time: str | None = None  # "DD:HH:MM:SS": stop training after this wall time
    gradient_clip_val: float | None = 1.0
    accumulate_grad_batches: int = 1
    val_check_interval: Any = None
    check_val_every_n_epoch: int = 1
    log_every_n_steps: int = 50
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    num_sanity_val_steps: int = 2
    enable_progress_bar: bool = True
    deterministic: bool = False


@dataclass
class MonitorSpec:
    """Which metric picks the best checkpoint and drives early stopping (`patience: null` disables it)."""

    metric: str = "val/exact_match"
    mode: str = "max"
    patience: int | None = None


@dataclass
class SidesSpec:
    """A source/target pair of component blocks; `tgt: null` means "share the source's"."""

    src: dict[str, Any] = field(default_factory=dict)
    tgt: dict[str, Any] | None = None


@dataclass
class Config:
    plugins: list[str] = field(default_factory=list)
    seed: int = 0
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    loader: LoaderSpec = field(default_factory=LoaderSpec)
    decode: DecodeSpec = field(default_factory=DecodeSpec)
    monitor: MonitorSpec = field(default_factory=MonitorSpec)
    data: dict[str, Any] = field(default_factory=dict)
    tokenizer: SidesSpec = field(default_factory=SidesSpec)
    embedding: SidesSpec = field(default_factory=SidesSpec)
    head: dict[str, Any] = field(default_factory=dict)
    metrics: list[str] = field(default_factory=lambda: ["exact_match"])
    loggers: list[str] = field(default_factory=lambda: ["csv"])  # csv | tensorboard
    save_every_n_steps: int | None = None  # train: also write checkpoints/last.ckpt every N steps
    resume: str | None = None  # train: continue the run in this run directory from its newest checkpoint
    ckpt: str | None = None  # evaluate / predict: the checkpoint to load
    input: str | None = None  # predict: file of sources
    output: str | None = None  # predict: where predictions go (default: the run dir); translate: default stdout
    beam: int | None = None  # translate: beam size (default: the checkpoint's decode.beam)
    length_penalty: float | None = None  # translate: GNMT alpha (default: the checkpoint's)
    n_best: int = 1  # translate: outputs per input; above 1, lines are "input_number<TAB>score<TAB>output"
    attention: str | None = None  # translate: also save cross-attention heatmaps of the inputs to this PNG


def _field_type(schema: type, key: str, path: str) -> Any:
    """The annotation of `key` in a dataclass schema, or a ConfigError naming the closest accepted key."""
    hints = typing.get_type_hints(schema)
    if key not in hints:
        where = f"{path}.{key}" if path else key
        raise ConfigError(
            f"unknown config key `{where}`.{hint(key, hints)} "
            f"Accepted keys{' under `' + path + '`' if path else ''}: {', '.join(hints)}"
        )
    return hints[key]


def _check_keys(schema: type, data: dict[str, Any], path: str) -> None:
    """Reject keys a dataclass schema does not have, recursively."""
    for key, value in data.items():
        sub = _field_type(schema, key, path)
        if dataclasses.is_dataclass(sub) and isinstance(value, dict):
            _check_keys(sub, value, f"{path}.{key}" if path else key)


def prepare_overrides(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """Check command-line override keys against the schema before Hydra composes; return them ready for Hydra.

    A misspelt schema key fails here with the key that was meant (Hydra would reject it without a hint).
    A key inside a plugin block (`data.n_val=64`) becomes Hydra's add-or-override form (`++data.n_val=64`): a
    plugin's options are its constructor's keyword arguments, and those its YAML leaves at their defaults are
    still settable; the registry checks them after composition. Group choices (`model=tiny`), additions,
    deletions and `hydra.*` keys pass unchanged.
    """
    parser = OverridesParser.create()
    prepared = []
    for text in overrides:
        if text.startswith("-") or "=" not in text:
            prepared.append(text)
            continue
        override = parser.parse_override(text)
        parts = override.key_or_group.split(".")
        groups_only = ("hydra", "experiment", "sweep")  # no schema field behind these
        if override.is_add() or override.is_delete() or override.is_force_add() or parts[0] in groups_only:
            prepared.append(text)
            continue
        schema: Any = Config
        for depth, key in enumerate(parts):
            if not dataclasses.is_dataclass(schema):
                text = "++" + text  # inside a plugin block
                break
            schema = _field_type(schema, key, ".".join(parts[:depth]))
        if isinstance(override.value(), dict) and type(None) in typing.get_args(schema):
            # OmegaConf cannot merge a block into a node that composed to null.
            raise ConfigError(f"`{override.key_or_group}` cannot be given as a block on the command line; choose "
                              "a config group option that defines it (e.g. `tokenizer=bpe_separate` for separate "
                              "vocabularies), then override its keys")
        prepared.append(text)
    return prepared


def _typed(data: dict[str, Any]) -> dict[str, Any]:
    """Type-check and convert through the structured schema; build the specs so their own checks run."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), data)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", "") or "config"
        raise ConfigError(f"`{key}`: {getattr(err, 'msg', err)}") from None
    plain = OmegaConf.to_container(merged, resolve=True)
    assert isinstance(plain, dict)
    ModelSpec(**plain["model"]), OptimSpec(**plain["optim"])
    return plain


def _check_components(config: dict[str, Any]) -> None:
    DATASETS.check(config["data"], (), "data")
    TOKENIZERS.check(config["tokenizer"]["src"], (), "tokenizer.src")
    context = ("d_model", "vocab_size", "padding_idx", "n_features")
    EMBEDDINGS.check(config["embedding"]["src"], context, "embedding.src")
    if config["tokenizer"]["tgt"] is not None:
        TOKENIZERS.check(config["tokenizer"]["tgt"], (), "tokenizer.tgt")
    if not config["model"]["share_embeddings"]:
        if config["embedding"]["tgt"] is None:
            raise ConfigError("`embedding.tgt` is null but `model.share_embeddings` is false: give the target "
                              "embedding, e.g. `embedding.tgt={name: token}`")
        EMBEDDINGS.check(config["embedding"]["tgt"], context, "embedding.tgt")
    HEADS.check(config["head"], ("d_model", "vocab_size"), "head")
    for name in config["metrics"]:
        METRICS.check({"name": name}, ("tokenizer",), "metrics")


def _check_trainer(config: dict[str, Any]) -> None:
    trainer, monitor = config["trainer"], config["monitor"]
    on_cpu = trainer["accelerator"] == "cpu" or (trainer["accelerator"] == "auto" and not torch.cuda.is_available())
    if on_cpu and trainer["precision"] in ("16-mixed", "16", "16-true"):
        raise ConfigError(
            f"`trainer.precision={trainer['precision']}` needs a GPU, and this run is on the CPU; "
            "use `trainer.precision=bf16-mixed` (or 32-true)"
        )
    if monitor["mode"] not in ("min", "max"):
        raise ConfigError(f"`monitor.mode` must be min or max, got {monitor['mode']!r}")
    unknown = set(config["loggers"]) - {"csv", "tensorboard"}
    if unknown:
        raise ConfigError(f"`loggers` may hold csv and tensorboard, got {sorted(unknown)}")
    if "tensorboard" in config["loggers"] and not (find_spec("tensorboard") or find_spec("tensorboardX")):
        raise ConfigError("`loggers` asks for tensorboard, which is not installed: "
                          "`pip install 'seq2seq[tensorboard]'`, or drop it from `loggers`")


def validate(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Composed config -> validated plain dict (all interpolations resolved, no OmegaConf objects)."""
    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(data, dict)
    _check_keys(Config, data, "")
    config = _typed(data)
    import_plugins(config["plugins"])
    _check_components(config)
    _check_trainer(config)
    return config


ConfigStore.instance().store(name="schema", node=Config)
# `conf/sweep/optuna.yaml` turns `monitor.mode` into the sweeper's direction.
OmegaConf.register_new_resolver("seq2seq.direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode],
                                replace=True)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Compose `conf/` with command-line style overrides and validate it, without running a Hydra app."""
    with hydra.initialize_config_module("seq2seq_conf", version_base="1.3"):
        return validate(hydra.compose("config", overrides=[*prepare_overrides(overrides), *searchpath_override()]))
