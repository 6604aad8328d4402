"""`seq2seq export`: a checkpoint written as an exported model folder (`seq2seq.export`), checked for parity.

Parity is checked when exporting, against the eager model, on the first `check_limit` pairs of a split: greedy and
beam-4 outputs token for token, and the teacher-forced log-probability of every reference token (within
`LOGPROB_TOLERANCE`) or, in label domains, the probability of every label (within `PROBABILITY_TOLERANCE`). A
full-precision export that decodes any of them differently, or whose probabilities drift, is an error, with one
exception: CTranslate2 runs its own beam search, which stops by its own rule (once its top candidate ends; with a
length penalty, once it holds K finished hypotheses), so it may end on another hypothesis. Without length
normalization, where it does, the one it chose must score at least as high under the model (`beam4_lower_scored` =
0); with it, its rule may stop before a better hypothesis, and `beam4_lower_scored` is reported, not refused.
A quantized export reports the agreement, and the metrics (e.g. BLEU, chrF) of both models on the first
`check_limit` pairs of the test split, decoded as the checkpoint's `decode:` says.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from seq2seq.domain import FeatureEncoder, Reader
from seq2seq.errors import ConfigError, ExportError
from seq2seq.export import ENGINES, FORMATS, MANIFEST, MODULE, QUANTIZATIONS, require
from seq2seq.module import Seq2SeqModule
from seq2seq.outputs import check_folder, read_json, refuse_inputs, replace_folder, storage
from seq2seq.registry import DATASETS
from seq2seq.schema import one_of
from seq2seq.translate import Translator

log = logging.getLogger(__name__)

LOGPROB_TOLERANCE = 1e-3  # largest |log p(eager) - log p(export)| of a reference token at full precision
PROBABILITY_TOLERANCE = 1e-4  # largest |p(eager) - p(export)| of a label (label domains) at full precision


def _write(module: Seq2SeqModule, fmt: str, quantization: str, out: Path) -> list[str]:
    model = module.model.eval()
    if fmt == "ctranslate2":
        from seq2seq.export.ctranslate2 import convert

        convert(model, module.src_tok, module.tgt_tok, out, quantization)
        return sorted(p.name for p in out.iterdir())
    from seq2seq.export.onnx import export

    src = module.src_tok
    example = (torch.zeros(1, 1, src.n_features) if isinstance(src, FeatureEncoder)
               else torch.zeros(1, 1, dtype=torch.long))
    forward = module.tgt_tok.label_ids is not None or module.config.decode.one_shot
    return export(model, example, out, forward)


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))


def metrics_of(module: Seq2SeqModule, outputs: list[list[int]], refs: list[list[int]]) -> dict[str, float]:
    """The module's configured metrics (e.g. BLEU, chrF) of decoded token ids against reference ids."""
    collection = module.metrics["test"].clone()
    collection.update(outputs, refs)
    return {k.removeprefix("test/"): float(v) for k, v in collection.compute().items()}


def _beam_differences(eager: Translator, exported: Translator, sources: list[Any]) -> dict[str, Any]:
    """Where two beam searches chose differently, the model scores of both choices."""
    if not sources:
        return {"beam4_lower_scored": 0}
    ours, theirs = (t.with_decoding(beam=4, sampling=False).n_best(sources, 1) for t in (eager, exported))
    pairs = [(o[0][0], t[0][0]) for o, t in zip(ours, theirs, strict=True)]
    return {"beam4_lower_scored": sum(t < o - LOGPROB_TOLERANCE for o, t in pairs),
            "beam4_differences": [{"eager_score": o, "export_score": t} for o, t in pairs[:10]]}


def parity(eager: Translator, exported: Translator, pairs: list[tuple[Any, Any]],
           scored: list[tuple[Any, Any]] | None = None) -> dict[str, Any]:
    """How the export decodes `pairs`' sources against the eager model (see the module's docstring), and the
    metrics of both on `scored`."""
    sources = [s for s, _ in pairs]
    report: dict[str, Any] = {"examples": len(pairs)}
    for name, changes in (("greedy", {"beam": 1, "sampling": False}), ("beam4", {"beam": 4, "sampling": False})):
        if eager.decoder.spec.one_shot and name == "beam4":
            continue
        ours, theirs = (t.with_decoding(**changes).tokens(sources) for t in (eager, exported))
        report[f"{name}_agreement"] = _agreement(ours, theirs)
        if name == "beam4":
            report.update(_beam_differences(eager, exported, [s for s, a, b in zip(sources, ours, theirs,
                                                                                 strict=True) if a != b]))
    if eager.module.tgt_tok.label_ids is None:
        ours, theirs = eager.scores(pairs), exported.scores(pairs)
        report["max_logprob_diff"] = max(abs(x - y) for a, b in zip(ours, theirs, strict=True)
                                         for x, y in zip(a, b, strict=True))
    else:
        diff = eager.label_probabilities(sources) - exported.label_probabilities(sources)
        report["max_probability_diff"] = float(diff.abs().max())
    if scored and eager.module.metrics["test"]:
        refs = [eager.module.tgt_tok.encode(t).tolist() for _, t in scored]
        report["scored"] = len(scored)
        for name, translator in (("eager", eager), ("export", exported)):
            report[f"metrics_{name}"] = metrics_of(eager.module, translator.tokens([s for s, _ in scored]), refs)
    return report


def _fitting(module: Seq2SeqModule, pairs: list[tuple[Any, Any]], limit: int) -> list[tuple[Any, Any]]:
    """The first `limit` pairs whose source and target (with EOS) fit the model's positions, as training keeps."""
    most = module.model.spec.max_positions
    fitting = ((s, t) for s, t in pairs
               if len(module.src_tok.encode(s)) <= most and len(module.tgt_tok.encode(t)) < most)
    return list(itertools.islice(fitting, limit))


def _check(report: dict[str, Any], fmt: str, normalized: bool) -> None:
    # CTranslate2's beam search is its own. Without length normalization both searches are exact for the best
    # hypothesis, so it may choose otherwise, never a hypothesis the model scores lower; with it, its stopping rule
    # (K finished hypotheses) may end on one the core's search would have passed over: reported, not refused.
    agreements = ("greedy_agreement",) + (("beam4_agreement",) if fmt == "onnx" else ())
    problems = [f"{key} = {report[key]:.4f}" for key in agreements if report.get(key, 1.0) < 1.0]
    if report.get("beam4_lower_scored", 0) and not normalized:
        problems.append(f"beam4_lower_scored = {report['beam4_lower_scored']}")
    elif report.get("beam4_lower_scored", 0):
        log.warning("CTranslate2's beam search ended on a lower-scored hypothesis than ours on %d of %d examples "
                    "(its stopping rule under length normalization); greedy outputs and log-probabilities agree",
                    report["beam4_lower_scored"], report["examples"])
    for key, tolerance in (("max_logprob_diff", LOGPROB_TOLERANCE), ("max_probability_diff", PROBABILITY_TOLERANCE)):
        if report.get(key, 0.0) > tolerance:
            problems.append(f"{key} = {report[key]:.2e} > {tolerance}")
    if problems:
        raise ExportError(f"the {fmt} export does not decode as the eager model does: {', '.join(problems)} "
                          f"on {report['examples']} examples")


def exported_files(folder: Path) -> set[str]:
    """The files of `folder` that an export wrote (its manifest and the files the manifest lists)."""
    manifest = read_json(folder / MANIFEST)
    files = manifest.get("files") if manifest is not None else None
    return {MANIFEST, *files} if isinstance(files, list) else set()


def export(ckpt: str | Path, fmt: str, output: str | Path, quantization: str = "none", check: str | None = "val",
           check_limit: int = 200, force: bool = False) -> dict[str, Any]:
    """Export the checkpoint `ckpt` to the folder `output`; returns the manifest. `check` names the split whose
    first `check_limit` pairs the parity check decodes (None: no check). An earlier export at `output` is replaced
    once the new one is complete; anything else there only with `force` (`seq2seq.outputs`)."""
    one_of("format", fmt, FORMATS)
    one_of(f"quantization` for `{fmt}", quantization, QUANTIZATIONS[fmt])
    require(ENGINES[fmt], "deploy")
    refuse_inputs("output", output, [ckpt])
    output = check_folder("output", output, exported_files, force)
    eager = Translator.from_checkpoint(ckpt)
    module = eager.module
    staging = output.with_name(f"{output.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    kept = "the export there before is intact" if output.exists() else "nothing was written there"
    try:
        with storage("the export", output, kept):
            staging.mkdir(parents=True)
            files = _write(module, fmt, quantization, staging)
            torch.save({"config": module.hparams["config"], "tokenizers": module.hparams["tokenizers"]},
                       staging / MODULE)
            manifest: dict[str, Any] = {
                "format": fmt, "quantization": quantization, "files": [*files, MODULE], "checkpoint": str(ckpt),
                "version": metadata.version("seq2seq"),
            }
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if check is not None:
            reader: Reader = DATASETS.build(module.config.data, "data")
            if check not in reader.splits:
                raise ConfigError(f"`check` must name a split of the reader ({', '.join(reader.splits)}) or be null")
            pairs = _fitting(module, reader.read(check).pairs, check_limit)
            scored = None
            if quantization != "none" and "test" in reader.splits:
                scored = _fitting(module, reader.read("test").pairs, check_limit)
            manifest["parity"] = {"split": check, **parity(eager, Translator.from_checkpoint(staging), pairs, scored)}
            if quantization == "none":
                spec = module.config.decode
                _check(manifest["parity"], fmt, spec.length_normalization == "average" or spec.length_penalty != 0)
            (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        with storage("the export", output, kept):
            replace_folder(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s (%s): %s", ckpt, output, fmt, json.dumps(manifest.get("parity", {})))
    return manifest
