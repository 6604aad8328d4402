"""The schemas of the commands' configs: pure data. Each command has its own root (`TrainConfig`, `EvaluateConfig`,
...); every key and its one default lives there, with its help, choices and bounds (`schema.setting`). YAML files
set only what differs. Composition and validation are `seq2seq.config`'s.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from seq2seq.data import LoaderSpec
from seq2seq.decoding import DecodeSpec
from seq2seq.errors import ConfigError
from seq2seq.model import ModelSpec
from seq2seq.outputs import FORCE_HELP
from seq2seq.schedule import OptimSpec
from seq2seq.schema import check, setting

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
    init: str | None = setting(None, "start from this checkpoint's weights, architecture and tokenizers (an "
                               "imported pretrained model, or another run's); the run gives data and training")
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
class ImportConfig:
    """`seq2seq import`: a pretrained Hugging Face translation model (a local MarianMTModel or
    M2M100ForConditionalGeneration folder) as a seq2seq checkpoint, checked against transformers first."""

    hf: str = setting(REQUIRED, "the model's folder: config.json, weights, tokenizer files (required)")
    output: str = setting(REQUIRED, "the checkpoint file to write (required)")
    target_lang: str | None = setting(None, "the output language: a multi-target OPUS-MT model's >>lang<< code, "
                                      "or an NLLB code such as eng_Latn")
    source_lang: str | None = setting(None, "NLLB: the input language code, such as kor_Hang")
    sentences: str | None = setting(None, "a file of source lines for the parity check (null: a built-in few)")
    tolerance: float = setting(1e-4, "largest teacher-forced logit difference from transformers allowed",
                               minimum=0)
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
                            "export": ExportConfig, "serve": ServeConfig, "average": AverageConfig,
                            "import": ImportConfig}
TRAINING = ("train", "prepare", "backtest")  # the commands that compose a whole training config
INFERENCE_GROUPS = {"evaluate": ("trainer",), "predict": (), "translate": (), "export": (), "serve": (),
                    "average": (), "import": ()}


def owners(key: str) -> list[str]:
    """The commands whose root schema has `key`."""
    return [command for command, schema in SCHEMAS.items() if key in {f.name for f in dataclasses.fields(schema)}]
