"""`seq2seq evaluate source=FILE reference=FILE`: a whole file of sources decoded and scored against a file of
references, line by line, as sacreBLEU and `fairseq-generate` users score a test set: every line, or an error
before any decoding says why not."""

from __future__ import annotations

import logging
from typing import Any

from seq2seq.domain import read_lines
from seq2seq.errors import ConfigError, DataError, some
from seq2seq.registry import METRICS
from seq2seq.translate import Translator

log = logging.getLogger("seq2seq")


def _lines(path: str, key: str) -> list[str]:
    try:
        lines, bad = read_lines(path)
    except OSError as err:
        raise ConfigError(f"`{key}={path}`: {err.strerror}") from None
    if bad:
        raise DataError(f"`{key}={path}`: blank or undecodable line(s) {some(bad)}; every line "
                        "must hold one sentence")
    return lines


def read_pairs(source: str, reference: str) -> list[tuple[str, str]]:
    """The aligned lines of the two files, checked: both readable, as many lines, none blank."""
    sources, references = _lines(source, "source"), _lines(reference, "reference")
    if len(sources) != len(references):
        raise DataError(f"`source={source}` has {len(sources)} lines and `reference={reference}` {len(references)}; "
                        "they must be aligned line by line")
    if not sources:
        raise DataError(f"`source={source}` is empty")
    return list(zip(sources, references, strict=True))


def score_files(translator: Translator, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """The checkpoint's metrics of the decoded sources against the references (`test/<metric>`), and how many
    lines were scored (`test/examples`). References are scored as the metrics score the val and test splits in
    training: through the target tokenizer, so normalized as it normalizes (NFKC for the text tokenizers)."""
    module, tok = translator.module, translator.module.tgt_tok
    if tok.label_ids is not None:
        raise ConfigError("`source=`/`reference=` score text outputs; this checkpoint's targets are labels: score "
                          "its data with `data.*` options instead")
    if not module.config.metrics:
        raise ConfigError("this checkpoint was trained with no `metrics`, so there is nothing to score the files by")
    sources = [s for s, _ in pairs]
    translator.encode(sources)  # every source fits the model, or the lines that do not are named
    refs = [tok.encode(r).tolist() for _, r in pairs]
    outputs = translator.tokens(sources)
    results: dict[str, Any] = {"test/examples": len(pairs)}
    for name in module.config.metrics:
        metric = METRICS.build({"name": name}, "metrics", tokenizer=tok)
        metric.update(outputs, refs)
        results[f"test/{name}"] = float(metric.compute())
    log.info("scored all %d lines: %s", len(pairs), ", ".join(f"{k} {v:.2f}" for k, v in results.items()
                                                               if k != "test/examples"))
    return results
