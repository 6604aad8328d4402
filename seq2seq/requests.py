"""What a request to `seq2seq serve` may ask: the server's limits, and the checks a request body passes, whole,
before it joins a batch (status and message for what it cannot have); its prefixes and constraints as guides."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from seq2seq.guides import Guide, Term, matching_terms
from seq2seq.schemas import ServeConfig
from seq2seq.translate import Translator


@dataclass(frozen=True)
class Limits:
    """The server's limits; their defaults and meaning are `ServeConfig`'s (`seq2seq serve --help`)."""

    max_batch: int = ServeConfig.max_batch
    max_wait_ms: float = ServeConfig.max_wait_ms
    max_inputs: int = ServeConfig.max_inputs
    max_chars: int = ServeConfig.max_chars
    max_body: int = ServeConfig.max_body
    max_queue: int = ServeConfig.max_queue
    max_work: int = ServeConfig.max_work



def _text_problem(data: dict, limits: Limits) -> tuple[int, str] | None:
    text = data.get("text")
    if text is None:
        return 422, 'missing "text": a string or a list of strings'
    texts = [text] if isinstance(text, str) else text
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        return 422, '"text" must be a string or a list of strings'
    if not texts:
        return 422, '"text" is empty'
    if len(texts) > limits.max_inputs:
        return 413, f'"text" has {len(texts)} sources; at most {limits.max_inputs} per request'
    for i, t in enumerate(texts):
        if not t.strip():
            return 422, f'"text"[{i}] is empty'
        if len(t) > limits.max_chars:
            return 413, f'"text"[{i}] has {len(t)} characters; at most {limits.max_chars}'
    return None


GUIDES = ("prefix", "include", "exclude")


def _guide_problem(data: dict) -> str | None:
    one = isinstance(data["text"], str)
    n = 1 if one else len(data["text"])
    for name in GUIDES:
        if name not in data:
            continue
        entries = [data[name]] if one else data[name]
        if not isinstance(entries, list) or len(entries) != n:
            return f'"{name}" must have one entry per source ({n})' + ("" if one else ", in a list")
        for i, entry in enumerate(entries):
            ok = (entry is None or isinstance(entry, str)) if name == "prefix" else (
                isinstance(entry, list) and all(isinstance(p, str) and p.strip() for p in entry))
            if not ok:
                kind = "a string or null" if name == "prefix" else "a list of non-empty strings"
                return f'"{name}"{"" if one else f"[{i}]"} must be {kind}, got {entry!r}'
    return None


def request_guides(translator: Translator, data: dict, texts: list[str], glossary: Sequence[Term]
                   ) -> list[Guide] | None:
    given = {name: ([data[name]] if isinstance(data["text"], str) else data[name]) if name in data else None
             for name in GUIDES}
    terms = matching_terms(texts, glossary)
    if all(value is None for value in given.values()) and not any(terms):
        return None
    return translator.guides(len(texts), given["prefix"], given["include"], given["exclude"], terms)


def _unicode_problem(data: Any) -> str | None:
    """What makes a parsed body invalid Unicode (JSON's `\\ud800` escapes decode to lone surrogates), or None."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        return f"the body holds a lone surrogate ({err.object[err.start:err.end]!a}), which is not Unicode text"
    return None


def request_problem(data: Any, limits: Limits, default_beam: int) -> tuple[int, str] | None:
    """(status, message) for a request body that cannot be served, else None."""
    if not isinstance(data, dict):
        return 422, 'the body must be a JSON object, e.g. {"text": ["..."]}'
    if (message := _unicode_problem(data)) is not None:
        return 422, message
    unknown = sorted(set(data) - {"text", "beam", "n_best", *GUIDES})
    if unknown:
        return 422, f"unknown field(s) {unknown}; the fields are text, beam, n_best, prefix, include, exclude"
    for name, top in (("beam", 64), ("n_best", 16)):
        value = data.get(name)
        if value is not None and (type(value) is not int or not 1 <= value <= top):
            return 422, f'"{name}" must be an integer from 1 to {top}, got {value!r}'
    if (problem := _text_problem(data, limits)) is not None:
        return problem
    n = 1 if isinstance(data["text"], str) else len(data["text"])
    work = n * (data.get("beam") or default_beam) * (data.get("n_best") or 1)
    if work > limits.max_work:
        return 413, (f"{n} sources × beam {data.get('beam') or default_beam} × n_best {data.get('n_best') or 1} = "
                     f"{work} hypotheses; at most {limits.max_work} per request: send fewer sources")
    message = _guide_problem(data)
    return None if message is None else (422, message)
