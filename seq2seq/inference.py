"""The commands that load a checkpoint (or an exported model): `evaluate`, `predict`, `translate`, `export`,
`average`, `serve`. They need nothing but the checkpoint and write only what they are asked to (`seq2seq.outputs`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from seq2seq.checkpoints import (
    AtomicCheckpointIO,
    average_checkpoints,
    is_checkpoint,
    read_checkpoint,
    weights_checkpoint,
)
from seq2seq.domain import Reader
from seq2seq.errors import ConfigError, DataError
from seq2seq.export import is_export, require
from seq2seq.exporting import export as export_model
from seq2seq.guides import Term, matching_terms, read_glossary, term_usage
from seq2seq.module import Seq2SeqModule
from seq2seq.outputs import (
    atomic_write,
    check_file,
    check_folder,
    is_our_text,
    json_sidecar,
    read_json,
    refuse_inputs,
    write_text,
)
from seq2seq.preparing import prepare_dataset
from seq2seq.references import read_pairs, score_files
from seq2seq.registry import DATASETS, METRICS
from seq2seq.schemas import (
    AverageConfig,
    EvaluateConfig,
    ExportConfig,
    InferenceConfig,
    PredictConfig,
    ServeConfig,
    TranslateConfig,
)
from seq2seq.sharding import gathered
from seq2seq.trainer import build_trainer, datamodule_for, first_scores, metric_signatures, write_metrics
from seq2seq.translate import Translator

log = logging.getLogger("seq2seq")


def _translator(config: InferenceConfig) -> Translator:
    if config.ensemble:
        exports = [p for p in (config.ckpt, *config.ensemble) if is_export(p)]
        if exports:
            raise ConfigError(f"an ensemble decodes checkpoints with the core's searches; {exports[0]} is an export")
        translator = Translator.ensemble([config.ckpt, *config.ensemble], config.batch_size)
    else:
        translator = Translator.from_checkpoint(config.ckpt, config.batch_size, config.threads)
    return translator.with_decoding(beam=config.beam, length_penalty=config.length_penalty,
                                    max_len_a=config.max_len_a, max_len_b=config.max_len_b)


def _inputs(config: PredictConfig | TranslateConfig, files: list[str | None]) -> list[str]:
    """What `predict` or `translate` reads (its input checked first), which none of its outputs may be."""
    given = [path for path in files if path is not None]
    for path in given[:1]:
        if not Path(path).is_file():
            raise ConfigError(f"`input={path}`: no such file")
    return [*given, config.ckpt, *config.ensemble]


def _checked_file(key: str, path: str | None, inputs: list[str], force: bool) -> Path | None:
    """A file `predict` or `translate` writes (with `<file>.json` beside it), checked before any work."""
    if path is None:
        return None
    for target in (Path(path), json_sidecar(Path(path))):
        refuse_inputs(key, target, inputs)
    return check_file(key, path, is_our_text, force)


@contextmanager
def _output(path: Path | None, translator: Translator, ckpt: str) -> Iterator[TextIO]:
    """A text file to write whole (with `<file>.json` beside it: the model, backend and decoding settings), or
    standard output."""
    if path is None:
        yield sys.stdout
        return
    with atomic_write(path) as f:
        yield f
    write_text(json_sidecar(path), json.dumps({"checkpoint": ckpt, **translator.settings()}, indent=2) + "\n")


def _evaluate_files(config: EvaluateConfig, out_dir: Path | None) -> dict[str, Any]:
    """`evaluate source=... reference=...`: the whole source file decoded and scored against the references."""
    if config.data or config.glossary:
        raise ConfigError("`source=`/`reference=` score two files as they are: drop `data.*` and `glossary`")
    pairs = read_pairs(config.source, config.reference)  # its mistakes before the checkpoint loads
    translator = _translator(config)
    results = {**score_files(translator, pairs), "checkpoint": config.ckpt, "source": config.source,
               "reference": config.reference, **translator.settings()}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_text(out_dir / "metrics.json", json.dumps(results, indent=2) + "\n")
    sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return results


def _checked_folder(config: EvaluateConfig) -> Path | None:
    """`evaluate`'s output folder, checked before any work (`seq2seq.outputs`)."""
    if config.output is None:
        return None
    inputs = [config.ckpt, *config.ensemble, *(p for p in (config.source, config.reference) if p)]
    refuse_inputs("output", config.output, inputs)
    return check_folder("output", config.output, _evaluation_files, config.force)


def _evaluation_files(folder: Path) -> set[str]:
    """Everything in `folder` when an evaluation wrote it (its metrics.json names the checkpoint)."""
    metrics = read_json(folder / "metrics.json")
    return {p.name for p in folder.iterdir()} if metrics is not None and "checkpoint" in metrics else set()


def evaluate(config: EvaluateConfig) -> dict[str, Any]:
    """Re-score a checkpoint on the val and test splits of its data, or of the data its reader reads with
    `config.data` options over the checkpoint's, or on a whole source file against its references; metrics go to
    standard output (and `output`/metrics.json)."""
    if (config.source is None) != (config.reference is None):
        raise ConfigError("give both `source=FILE` and `reference=FILE` (a whole file scored line by line), or "
                          "neither (the val and test splits of the checkpoint's data)")
    out_dir = _checked_folder(config)
    if config.source is not None:
        return _evaluate_files(config, out_dir)
    return _evaluate_splits(config, out_dir)


def _refuse_for_splits(config: EvaluateConfig) -> None:
    if is_export(config.ckpt):
        raise ConfigError(f"`seq2seq evaluate` scores the splits of checkpoints; {config.ckpt} is an exported "
                          "model, whose agreement with its checkpoint is in its seq2seq_export.json (give it "
                          "`source=` and `reference=` files to score)")
    if config.ensemble and config.trainer.strategy == "fsdp":
        raise ConfigError("`ensemble=` decodes several models as one, which `trainer=fsdp` does not shard: score "
                          "the ensemble with `trainer=ddp` (or in one process)")


def _evaluate_splits(config: EvaluateConfig, out_dir: Path | None) -> dict[str, Any]:
    """`evaluate`'s val and test splits, through the trainer as in training."""
    _refuse_for_splits(config)
    translator = _translator(config)
    glossary = _glossary(translator, config.glossary) if config.glossary else None  # its mistakes before any work
    module = translator.module
    module.decoder = translator.decoder
    first = module.model
    if config.ensemble:  # validation and test score the ensemble: its loss, and its searches
        module.model = translator.backend.model
    data = {**module.config.data, **config.data}
    DATASETS.check(data, (), "data")  # an option of another reader is refused here, naming the accepted ones
    reader: Reader = DATASETS.build(data, "data")
    held_out = tuple(name for name in reader.splits if name in ("val", "test"))
    with tempfile.TemporaryDirectory() as scratch:
        root = out_dir or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        prepared = prepare_dataset(dataclasses.replace(module.config, data=data), reader, Path(scratch) / "prepared",
                                   module.hparams["tokenizers"], splits=held_out)
        datamodule = datamodule_for(module.config, module, prepared, None, config.batch_size)
        trainer = build_trainer(config.trainer, root, [], False)
        results: dict[str, Any] = {}
        if "val" in held_out:
            results.update(first_scores(trainer.validate(module, datamodule=datamodule, verbose=False)))
        if "test" in held_out:
            results.update(first_scores(trainer.test(module, datamodule=datamodule, verbose=False)))
        module.model = first  # the domain's report decodes through the translator; its plots show `ckpt`'s model
        with gathered(module.model):  # (sharded by `trainer=fsdp`: whole on every rank, for rank 0's report)
            if trainer.is_global_zero:
                results.update(reader.report(translator, root))
                if glossary:
                    results.update(_glossary_scores(translator, reader, glossary))
    results.update(metric_signatures(module))
    results["checkpoint"] = config.ckpt
    if config.ensemble:
        results["ensemble"] = [config.ckpt, *config.ensemble]
    if out_dir is not None:
        write_metrics(trainer, out_dir / "metrics.json", results)
    if trainer.is_global_zero:
        sys.stdout.write(json.dumps(results, indent=2) + "\n")
    return results


def _glossary(translator: Translator, path: str) -> list[Term]:
    """The glossary file's terms, each target checked against the model's vocabulary."""
    glossary = read_glossary(path)
    translator.check_glossary(glossary)
    return glossary


def _glossary_scores(translator: Translator, reader: Reader, glossary: list[Term]) -> dict[str, float]:
    """The test split decoded without and with the glossary's terms as constraints: the module's metrics on each
    (`test/glossary/<metric>`), and term usage, the share of expected target terms that the outputs contain."""
    pairs = [pair for rows in reader.stream(("test",)) for pair in rows.pairs]
    if not pairs:
        raise ConfigError("`glossary` scores the test split, and this data has none")
    sources = [src for src, _ in pairs]
    module, tok = translator.module, translator.module.tgt_tok
    refs = [tok.encode(tgt).tolist() for _, tgt in pairs]
    terms = matching_terms(sources, glossary)
    guides = translator.guides(len(sources), terms=terms)
    results: dict[str, float] = {"test/glossary/terms": float(sum(map(len, terms)))}
    for prefix, chosen in (("test", None), ("test/glossary", guides)):
        outputs = translator.tokens(sources, chosen)
        for name in module.config.metrics:
            metric = METRICS.build({"name": name}, "metrics", tokenizer=tok)
            metric.update(outputs, refs)
            results[f"{prefix}/{name}"] = float(metric.compute())
        used, expected = term_usage([tok.decode(o) for o in outputs], terms)
        results[f"{prefix}/term_usage"] = used / max(expected, 1)
    log.info("glossary: %d expected target terms in the test split; used %.1f%% without constraints, %.1f%% with",
             results["test/glossary/terms"], 100 * results["test/term_usage"],
             100 * results["test/glossary/term_usage"])
    return results


def _read_prefixes(path: str, n: int) -> list[str]:
    try:
        prefixes = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"prefix file {path}: cannot be read as UTF-8 text ({err})") from None
    if len(prefixes) != n:
        raise DataError(f"prefix file {path} has {len(prefixes)} lines for {n} inputs; give one line per input "
                        "(an empty line for no prefix)")
    return prefixes


def predict(config: PredictConfig) -> None:
    """Decode every source in `config.input` with nothing but the checkpoint, in the domain's output format."""
    output = _checked_file("output", config.output, _inputs(config, [config.input]), config.force)
    translator = _translator(config)
    reader: Reader = DATASETS.build(translator.module.config.data, "data")
    sources = reader.read_inputs(config.input)
    with _output(output, translator, config.ckpt) as out:
        n = reader.write_predictions(translator, sources, out)
    log.info("wrote predictions for %d inputs to %s", n, config.output or "standard output")


def translate(config: TranslateConfig) -> None:
    """Lines from `input` (default: standard input) to `output` (default: standard output)."""
    inputs = _inputs(config, [config.input, config.prefix, config.glossary])
    output = _checked_file("output", config.output, inputs, config.force)
    attention = _checked_file("attention", config.attention, [*inputs, *([config.output] if output else [])],
                              config.force)
    translator = _translator(config)
    reader: Reader = DATASETS.build(translator.module.config.data, "data")
    lines = reader.read_inputs(config.input or "/dev/stdin")
    guides, terms = None, None
    if config.prefix or config.glossary:
        prefixes = _read_prefixes(config.prefix, len(lines)) if config.prefix else None
        terms = matching_terms(lines, _glossary(translator, config.glossary)) if config.glossary else None
        guides = translator.guides(len(lines), prefixes, terms=terms)
    if config.n_best == 1:
        outputs = translator.translate(lines, guides)
        text = "".join(f"{out}\n" for out in outputs)
        if terms:
            used, expected = term_usage(outputs, terms)
            log.info("glossary: %d of %d expected target terms used", used, expected)
    else:
        found = translator.n_best(lines, config.n_best, guides)
        text = "".join(f"{i}\t{score:.4f}\t{out}\n" for i, best in enumerate(found, 1) for score, out in best)
    with _output(output, translator, config.ckpt) as out:
        out.write(text)
    if attention is not None:
        if translator.backend.name != "eager":
            raise ConfigError("attention maps come from the eager model: give `ckpt=` a checkpoint, not an export")
        reader.plot_attention(translator, lines[:4], attention)
        write_text(json_sidecar(attention), json.dumps({"checkpoint": config.ckpt, **translator.settings()},
                                                       indent=2) + "\n")


def export(config: ExportConfig) -> None:
    """Write `config.ckpt` as an exported model folder, checked for parity; the manifest goes to standard output."""
    manifest = export_model(config.ckpt, config.format, config.output, config.quantization, config.check,
                            config.check_limit, config.force)
    sys.stdout.write(json.dumps(manifest, indent=2) + "\n")


def average(config: AverageConfig) -> Path:
    """Write the mean of `config.ckpts` (files or glob patterns, in the order given; a pattern's matches sorted)
    to `config.output`; one LoRA checkpoint alone merged, one sharded checkpoint (a folder) alone consolidated."""
    paths: list[Path] = []
    for given in config.ckpts:
        matches = sorted(map(Path, glob.glob(given))) if any(c in given for c in "*?[") else [Path(given)]
        if not matches:
            raise ConfigError(f"`ckpts`: no checkpoint matches {given}")
        paths += matches
    if len(paths) < 2 and not (paths and (paths[0].is_dir() or _adapted(read_checkpoint(paths[0])))):
        raise ConfigError(f"`ckpts` names {len(paths)} checkpoint(s); averaging needs two or more, e.g. "
                          "'ckpts=[runs/x/checkpoints/step*.ckpt]' (one LoRA checkpoint alone is merged, one "
                          "sharded checkpoint alone consolidated into one file)")
    refuse_inputs("output", config.output, paths)
    output = check_file("output", config.output, is_checkpoint, config.force)
    AtomicCheckpointIO().save_checkpoint(average_checkpoints(paths, _merged), output)
    log.info("averaged %d checkpoints into %s: %s", len(paths), output, ", ".join(map(str, paths)))
    return output


def _adapted(ckpt: dict[str, Any]) -> bool:
    return bool(ckpt["hyper_parameters"]["config"]["model"].get("lora", {}).get("rank"))


def _merged(path: Path) -> dict[str, Any]:
    """A checkpoint's plain data; a LoRA checkpoint's with its adapters merged into its base's weights (an average
    of adapters factor by factor would not be the average of the models)."""
    ckpt = read_checkpoint(path)
    if not _adapted(ckpt):
        return ckpt
    module = Seq2SeqModule.from_checkpoint(path)
    return weights_checkpoint({**ckpt, "hyper_parameters": dict(module.hparams)}, module.state_dict())


def serve(config: ServeConfig) -> None:
    """Serve `config.ckpt` (a checkpoint or an export) over HTTP until interrupted."""
    require(("fastapi", "uvicorn"), "serve")
    from seq2seq.serve import Limits, run

    limits = Limits(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Limits)})
    run(_translator(config), limits, config.host, config.port,
        read_glossary(config.glossary) if config.glossary else [])  # the server checks it against the model
