"""Config flow: Hydra composes `conf/<command>.yaml` -> `validate` -> a frozen dataclass tree.

Each command has its own root schema (`TrainConfig`, `EvaluateConfig`, `PredictConfig`, `TranslateConfig`); every
key and its one default lives there, with its help, choices and bounds (`schema.setting`). YAML files set only what
differs. Plugin blocks (`data`, `tokenizer`, `embedding`, `head`, `metrics`) are checked against the registered
constructors' signatures. `validate` reports every mistake of a config at once, before any data are read.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any, ClassVar

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from seq2seq import metrics  # noqa: F401 - registers the core's metric
from seq2seq.data import LoaderSpec
from seq2seq.decoding import DecodeSpec
from seq2seq.errors import ConfigError
from seq2seq.model import ModelSpec
from seq2seq.outputs import FORCE_HELP
from seq2seq.plugins import import_plugins, search_path, searchpath_override, trust
from seq2seq.registry import DATASETS, EMBEDDINGS, HEADS, METRICS, TOKENIZERS
from seq2seq.schedule import OptimSpec
from seq2seq.schema import build, check, describe, field_type, hint, join, setting, to_data

PRECISIONS = ("auto", "64-true", "64", "32-true", "32", "bf16-mixed", "bf16-true", "bf16", "16-mixed", "16-true", "16",
              "transformer-engine", "transformer-engine-float16")
LOGGERS = ("csv", "tensorboard")
REQUIRED = "???"  # a value the command line must give
PLUGINS_HELP = ("plugin modules to import that are not installed as seq2seq plugins (a checkpoint's own are "
                "imported only when they are)")


@dataclass(frozen=True)
class TrainerSpec:
    """Keyword arguments of `lightning.Trainer` that runs may set (the `trainer:` block)."""

    block: ClassVar[str] = "trainer"
    accelerator: str = setting("auto", "cpu, gpu, auto, ... (Lightning's accelerator)")
    devices: Any = setting("auto", "devices per node: a count, a list of ids, or auto")
    strategy: str = setting("auto", "auto, ddp, ddp_spawn, fsdp, ... (Lightning's strategy)")
    num_nodes: int = setting(1, "nodes, for multi-node strategies", minimum=1)
    precision: str = setting("auto", "numeric precision; auto: bf16-mixed where the device computes bf16 faster than "
                             "fp32 (a CUDA GPU of compute capability 8+, a CPU with AMX), else 32-true",
                             choices=PRECISIONS)
    max_epochs: int = setting(10, "stop after this many epochs (-1: no limit)", minimum=-1)
    max_steps: int = setting(-1, "stop after this many optimizer steps (-1: no limit)", minimum=-1)
    max_time: str | None = setting(None, "stop training after this wall time, DD:HH:MM:SS")
    gradient_clip_val: float | None = setting(1.0, "clip gradients to this norm (null: no clipping)", minimum=0)
    accumulate_grad_batches: int = setting(1, "batches per optimizer step", minimum=1)
    val_check_interval: Any = setting(None, "validate every N training batches (int) or fraction of an epoch")
    check_val_every_n_epoch: int = setting(1, "validate every N epochs", minimum=1)
    log_every_n_steps: int = setting(50, "log training metrics (and progress lines) every N steps", minimum=1)
    limit_train_batches: Any = setting(None, "training batches per epoch: a count or a fraction")
    limit_val_batches: Any = setting(None, "validation batches: a count or a fraction (0: no validation)")
    limit_test_batches: Any = setting(None, "test batches in final scoring: a count or a fraction (0: none)")
    num_sanity_val_steps: int = setting(2, "validation batches run before training starts", minimum=-1)
    enable_progress_bar: bool | None = setting(None, "a progress bar; null: a bar on a terminal, log lines elsewhere")
    deterministic: bool = setting(False, "deterministic algorithms only")

    def __post_init__(self) -> None:
        check(self)
        if self.max_steps == 0:
            raise ConfigError("`trainer.max_steps=0` trains nothing; give -1 (no limit) or a number of steps")
        if self.max_time is not None and not re.fullmatch(r"\d+:\d{1,2}:\d{1,2}:\d{1,2}", str(self.max_time)):
            raise ConfigError(f"`trainer.max_time` must be DD:HH:MM:SS (e.g. 00:00:30:00 for 30 minutes), got "
                              f"{self.max_time!r}")
        interval = self.val_check_interval
        if interval is not None and not (
                (type(interval) is int and interval >= 1) or (type(interval) is float and 0 < interval <= 1)):
            raise ConfigError("`trainer.val_check_interval` must be a number of training batches (an integer of at "
                              f"least 1) or a fraction of an epoch (0 < x <= 1), got {interval!r}")


@dataclass(frozen=True)
class MonitorSpec:
    """Which metric picks the best checkpoint and drives early stopping."""

    block: ClassVar[str] = "monitor"
    metric: str = setting("val/exact_match", "val/loss or val/<one of metrics>: picks the best checkpoint")
    mode: str = setting("max", "whether higher or lower is better", choices=("min", "max"))
    patience: int | None = setting(None, "stop after this many validations without improvement (null: never)",
                                   minimum=1)

    def __post_init__(self) -> None:
        check(self)


@dataclass(frozen=True)
class SidesSpec:
    """A source/target pair of component blocks; `tgt: null` means "share the source's"."""

    block: ClassVar[str] = "sides"
    src: dict[str, Any] = setting({}, "the source side's component: {name: ..., options}")
    tgt: dict[str, Any] | None = setting(None, "the target side's component; null: the source's")


@dataclass(frozen=True)
class TokenizerSpec(SidesSpec):
    """The tokenizers of both sides, and what they are fitted on."""

    block: ClassVar[str] = "tokenizer"
    fit_sample: int | None = setting(None, "fit on this many training pairs, drawn reproducibly (null: all of them)",
                                     minimum=1)


@dataclass(frozen=True)
class TrainConfig:
    """`seq2seq train`: fit a model, keep the best checkpoint, score it on the held-out splits."""

    plugins: list[str] = setting([], "plugin modules whose components this config names")
    seed: int = setting(0, "seed of initialization, data order and dropout")
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    optim: OptimSpec = dataclasses.field(default_factory=OptimSpec)
    trainer: TrainerSpec = dataclasses.field(default_factory=TrainerSpec)
    loader: LoaderSpec = dataclasses.field(default_factory=LoaderSpec)
    decode: DecodeSpec = dataclasses.field(default_factory=DecodeSpec)
    monitor: MonitorSpec = dataclasses.field(default_factory=MonitorSpec)
    data: dict[str, Any] = setting({}, "the domain's reader: {name: ..., options}")
    tokenizer: TokenizerSpec = dataclasses.field(default_factory=TokenizerSpec)
    embedding: SidesSpec = dataclasses.field(default_factory=SidesSpec)
    head: dict[str, Any] = setting({}, "the output head: {name: ..., options}")
    metrics: list[str] = setting(["exact_match"], "metrics decoded and scored on val and test")
    loggers: list[str] = setting(["csv"], "csv and/or tensorboard")
    save_every_n_steps: int | None = setting(None, "also write checkpoints/last.ckpt every N steps", minimum=1)
    average_last: int | None = setting(None, "keep the weights of the last N validations; at the end, average them "
                                       "into checkpoints/averaged.ckpt and score it, used when it validates better "
                                       "than the best checkpoint", minimum=2)
    resume: str | None = setting(None, "continue the run in this run directory from its newest checkpoint")
    prepared: str | None = setting(None, "the prepared dataset to train on (`seq2seq prepare` writes it; prepared "
                                   "here first if absent). null: prepared/<experiment> if there, else the run's own")
    force: bool = setting(False, f"`prepared=`: {FORCE_HELP}")


@dataclass(frozen=True)
class PrepareConfig(TrainConfig):
    """`seq2seq prepare`: read, fit the tokenizers and encode the data of a training config once, into Arrow shards
    that every process of `seq2seq train` reads; run it with the overrides training will have."""

    workers: int = setting(1, "processes that encode (1: this one)", minimum=1)
    shard_size: int = setting(1_000_000, "examples per shard file", minimum=1)


@dataclass(frozen=True)
class BacktestConfig(TrainConfig):
    """`seq2seq backtest`: rolling-origin evaluation of a training config whose reader splits by year. The years
    from `data.test_from` to the data's last year are cut into `folds` consecutive test blocks; fold k trains on the
    years before its block less `val_years` of validation, and is tested on its block, all in one process. Writes
    fold-<k>/ run directories, backtest.json (per fold and pooled) and the domain's pooled plots."""

    folds: int = setting(5, "test blocks, each after the years its model trains and validates on", minimum=1)
    block_years: int | None = setting(None, "years per test block (default: the test years shared out)", minimum=1)
    val_years: int | None = setting(None, "validation years before each block (default: data.test_from - "
                                    "data.val_from)", minimum=1)


@dataclass(frozen=True)
class InferenceConfig:
    """What every command that loads a checkpoint takes."""

    ckpt: str = setting(REQUIRED, "the checkpoint to load (required)")
    plugins: list[str] = setting([], PLUGINS_HELP)
    batch_size: int | None = setting(None, "sources per batch (default: the checkpoint's loader.batch_size)",
                                     minimum=1)
    beam: int | None = setting(None, "beam size (default: the checkpoint's decode.beam)", minimum=1)
    length_penalty: float | None = setting(None, "GNMT alpha (default: the checkpoint's decode.length_penalty)")
    max_len_a: float | None = setting(None, "at most a · source length + b output tokens: a (default: the "
                                            "checkpoint's decode.max_len_a)", minimum=0)
    max_len_b: int | None = setting(None, "at most a · source length + b output tokens: b (default: the "
                                          "checkpoint's decode.max_len_b)", minimum=0)
    threads: int | None = setting(None, "CPU threads of an exported model's engine (default: torch's)", minimum=1)
    ensemble: list[str] = setting([], "more checkpoints decoding with `ckpt` as one model (the mean of their "
                                      "log-probabilities); they must share its tokenizers")


@dataclass(frozen=True)
class EvaluateConfig(InferenceConfig):
    """`seq2seq evaluate`: re-score a checkpoint on the val and test splits of its data, or of other data."""

    data: dict[str, Any] = setting({}, "reader options over the checkpoint's `data:` block, e.g. data.path=other.tsv")
    source: str | None = setting(None, "a file of sources, one per line: decoded whole and scored against "
                                       "`reference` (in place of the data's val and test splits)")
    reference: str | None = setting(None, "the references of `source`, line by line")
    trainer: TrainerSpec = dataclasses.field(default_factory=TrainerSpec)
    output: str | None = setting(None, "also write metrics.json and the domain's report (plots) into this folder")
    force: bool = setting(False, FORCE_HELP)
    glossary: str | None = setting(None, "a `source term<TAB>target term` file: also decode the test split with "
                                         "its terms as constraints and report term usage with and without them")


@dataclass(frozen=True)
class PredictConfig(InferenceConfig):
    """`seq2seq predict`: decode every source of a file, in the domain's output format."""

    input: str = setting(REQUIRED, "file of sources, as the domain reads them (required)")
    output: str | None = setting(None, "where predictions go (default: standard output)")
    force: bool = setting(False, FORCE_HELP)


@dataclass(frozen=True)
class TranslateConfig(InferenceConfig):
    """`seq2seq translate`: lines in, lines out, decoded as the checkpoint's `decode:` (or `beam=`) says; n-best
    lists with scores by beam search."""

    input: str | None = setting(None, "file of sources, one per line (default: standard input)")
    output: str | None = setting(None, "where outputs go (default: standard output)")
    force: bool = setting(False, FORCE_HELP)
    n_best: int = setting(1, "outputs per input; above 1, lines are input_number<TAB>score<TAB>output", minimum=1)
    attention: str | None = setting(None, "also save cross-attention heatmaps of the first inputs to this PNG")
    prefix: str | None = setting(None, "a file of target prefixes, line by line with the inputs (an empty line: "
                                       "none): each output starts with its prefix, and the search goes on from it")
    glossary: str | None = setting(None, "a `source term<TAB>target term` file: an input containing a source term "
                                         "gets its target term in the output (lexically constrained beam search)")


@dataclass(frozen=True)
class ExportConfig:
    """`seq2seq export`: write a checkpoint as a self-contained CTranslate2 or ONNX model folder, checked against
    the eager model (see `seq2seq.export`)."""

    ckpt: str = setting(REQUIRED, "the checkpoint to export (required)")
    plugins: list[str] = setting([], PLUGINS_HELP)
    format: str = setting(REQUIRED, "the engine (required)", choices=("ctranslate2", "onnx"))
    output: str = setting(REQUIRED, "the folder to write (required); an earlier export there is replaced")
    force: bool = setting(False, FORCE_HELP)
    quantization: str = setting("none", "precision of the weights (ctranslate2; onnx: none)",
                                choices=("none", "int8", "int8_float32", "bfloat16"))
    check: str | None = setting("val", "the split whose pairs the parity check decodes (null: no check)")
    check_limit: int = setting(200, "pairs of that split the parity check decodes", minimum=1)


@dataclass(frozen=True)
class AverageConfig:
    """`seq2seq average`: one checkpoint whose weights are the mean of several checkpoints of one run (its last or
    best few), to score, decode and export like any other."""

    ckpts: list[str] = setting([], "the checkpoints to average: files or glob patterns (required), e.g. "
                               "'ckpts=[runs/x/checkpoints/step*.ckpt]'")
    output: str = setting(REQUIRED, "the checkpoint file to write (required)")
    force: bool = setting(False, FORCE_HELP)


@dataclass(frozen=True)
class ServeConfig(InferenceConfig):
    """`seq2seq serve`: an HTTP translation service (POST /translate, GET /health) over a checkpoint or an exported
    model, batching concurrent requests."""

    host: str = setting("127.0.0.1", "the address to listen on (0.0.0.0: every interface)")
    port: int = setting(8080, "the port to listen on (0: any free one)", minimum=0, maximum=65535)
    max_batch: int = setting(32, "most sources decoded together from concurrent requests", minimum=1)
    max_wait_ms: float = setting(5.0, "how long a request waits for others to share its batch", minimum=0)
    max_inputs: int = setting(64, "most sources in one request", minimum=1)
    max_chars: int = setting(2000, "longest source, in characters", minimum=1)
    max_body: int = setting(1_000_000, "largest request body, in bytes", minimum=1)
    max_queue: int = setting(256, "most sources waiting; beyond them requests get 503 with Retry-After", minimum=1)
    max_work: int = setting(512, "most sources × beam × n_best in one request", minimum=1)
    glossary: str | None = setting(None, "a `source term<TAB>target term` file: a source containing a source term "
                                         "gets its target term in the output, beside the request's own include")


SCHEMAS: dict[str, type] = {"train": TrainConfig, "prepare": PrepareConfig, "backtest": BacktestConfig,
                            "evaluate": EvaluateConfig, "predict": PredictConfig, "translate": TranslateConfig,
                            "export": ExportConfig, "serve": ServeConfig, "average": AverageConfig}
TRAINING = ("train", "prepare", "backtest")  # the commands that compose a whole training config
INFERENCE_GROUPS = {"evaluate": ("trainer",), "predict": (), "translate": (), "export": (), "serve": (),
                    "average": ()}
ELSEWHERE = {"folds": "backtest", "block_years": "backtest", "val_years": "backtest", "workers": "prepare",
             "shard_size": "prepare", "beam": "translate", "length_penalty": "translate",
             "n_best": "translate", "attention": "translate", "ckpt": "evaluate, predict, translate, export and serve",
             "ckpts": "average",
             "input": "predict and translate", "source": "evaluate", "reference": "evaluate", "format": "export",
             "quantization": "export", "port": "serve",
             "glossary": "evaluate, translate and serve"}


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
        if depth == 0 and part in ELSEWHERE and part not in typing.get_type_hints(schema):
            raise ConfigError(f"`{part}` is an option of `seq2seq {ELSEWHERE[part]}`, not of `seq2seq {command}`"
                              + ("; validation decoding follows `decode.*`"
                                 if command in TRAINING and ELSEWHERE[part] == "translate" else ""))
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
    # fp32 speed (the README's precision section has the figures). torch.cpu's feature query is private.
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


def _train_problems(config: TrainConfig) -> list[str]:
    trainer, monitor, problems = config.trainer, config.monitor, []
    on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())
    if on_cpu and trainer.precision in ("16-mixed", "16", "16-true"):
        problems.append(f"`trainer.precision={trainer.precision}` needs a GPU, and this run is on the CPU; "
                        "use `trainer.precision=bf16-mixed` (or 32-true)")
    if on_cpu and trainer.strategy.startswith("fsdp"):
        problems.append(f"`trainer.strategy={trainer.strategy}` (Lightning's FSDP) needs CUDA GPUs, and this run is "
                        "on the CPU; use `trainer=ddp` for several CPU processes")
    if (memory := _memory_problem(config)) is not None:
        problems.append(memory)
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
