"""Typed config schemas: frozen dataclasses whose fields carry their one default, help, choices and bounds.

`setting(default, help, choices=..., minimum=..., maximum=...)` declares a field. A spec dataclass calls
`check(self)` in `__post_init__`, so a spec built in code is checked like one built from YAML. `build(schema, data,
path)` turns plain data into the frozen tree and reports every problem it finds at once: unknown keys (with a close
match), wrong types, values outside their choices or bounds, and what each spec's own checks refuse.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import types
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

from seq2seq.errors import ConfigError, excerpt

S = TypeVar("S")


def setting(default: Any, help: str, *, choices: Iterable[Any] | None = None, minimum: float | None = None,
            maximum: float | None = None) -> Any:
    """A schema field: its default, a one-line help (shown by `seq2seq <command> --help` and in errors), and the
    values it accepts (numbers: finite, and within the bounds given; for a list of numbers, each of them)."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None, "minimum": minimum,
            "maximum": maximum}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def hint(word: str, choices: Iterable[str]) -> str:
    """' Did you mean `x`?' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" Did you mean `{close[0]}`?" if close else ""


def not_one_of(where: str, value: Any, choices: Iterable[Any]) -> str:
    """What to say of a value outside its choices, with the nearest one."""
    accepted = [str(c) for c in choices]
    return f"`{where}` must be one of {', '.join(accepted)}, got {excerpt(value)}{hint(str(value), accepted)}"


def one_of(where: str, value: Any, choices: Iterable[Any]) -> None:
    """A ConfigError unless `value` is one of `choices` (for options checked outside a schema: a plugin's)."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(not_one_of(where, value, choices))


def type_ok(value: object, annotation: object) -> bool:
    """A shallow check of a YAML value against an annotation; annotations it does not know pass."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation in (str, bool):
        return isinstance(value, annotation)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return True


def _type_name(annotation: object) -> str:
    return str(annotation).replace("typing.", "") if typing.get_origin(annotation) else getattr(
        annotation, "__name__", str(annotation))


def _value_problems(where: str, value: Any, annotation: object, meta: typing.Mapping[str, Any]) -> list[str]:
    """What is wrong with one value, each message ending with the field's help."""
    about = f" ({meta['help']})" if meta.get("help") else ""
    return [p + about for p in _wrong(where, value, annotation, meta)]


def _wrong(where: str, value: Any, annotation: object, meta: typing.Mapping[str, Any]) -> list[str]:
    if not type_ok(value, annotation):
        return [f"`{where}` must be {_type_name(annotation)}, got {excerpt(value)}, a {type(value).__name__}"]
    choices, minimum = meta.get("choices"), meta.get("minimum")
    if choices is not None and value is not None and value not in choices:
        return [not_one_of(where, value, choices)]
    numbers = value if isinstance(value, (list, tuple)) else [value]
    for number in (n for n in numbers if isinstance(n, (int, float)) and not isinstance(n, bool)):
        if not math.isfinite(number):
            return [f"`{where}` must be a finite number, got {excerpt(value)}"]
        if minimum is not None and number < minimum:
            return [f"`{where}` must be at least {minimum}, got {excerpt(value)}"]
        if meta.get("maximum") is not None and number > meta["maximum"]:
            return [f"`{where}` must be at most {meta['maximum']}, got {excerpt(value)}"]
    return []


def check(spec: Any) -> None:
    """Raise one ConfigError listing every field of `spec` (a schema dataclass) that has a wrong type, value or
    bound; spec classes call it from `__post_init__`."""
    block = type(spec).block
    hints = typing.get_type_hints(type(spec))
    problems = [p for f in dataclasses.fields(spec)
                for p in _value_problems(f"{block}.{f.name}", getattr(spec, f.name), hints[f.name], f.metadata)]
    if problems:
        raise ConfigError(join(problems))


def join(problems: list[str]) -> str:
    """One message for one or many problems."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the config:\n" + "\n".join(f"  - {p}" for p in problems)


def unknown_key(key: str, accepted: Iterable[str], path: str) -> str:
    accepted = list(accepted)
    where = f"{path}.{key}" if path else key
    return (f"unknown config key `{where}`.{hint(key, accepted)} "
            f"Accepted keys{' under `' + path + '`' if path else ''}: {', '.join(accepted)}")


def field_type(schema: type, key: str, path: str) -> Any:
    """The annotation of `key` in a schema dataclass, or a ConfigError naming the closest accepted key."""
    fields = [f.name for f in dataclasses.fields(schema)]  # not its class variables (`block`)
    if key not in fields:
        raise ConfigError(unknown_key(key, fields, path))
    return typing.get_type_hints(schema)[key]


def build(schema: type[S], data: typing.Mapping[str, Any], path: str = "") -> tuple[S, list[str]]:
    """Plain data -> a frozen instance of `schema` (defaults for what is missing), and every problem found. With
    problems, the instance holds defaults in place of what is wrong, so that later checks can still run."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    problems = [unknown_key(key, fields, path) for key in data if key not in fields]
    values: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields:
            continue
        where = f"{path}.{name}" if path else name
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, typing.Mapping):
                problems.append(f"`{where}` must be a block of keys, got {excerpt(value)}")
                continue
            values[name], sub = build(annotation, value, where)  # type: ignore[arg-type]
            problems += sub
            continue
        wrong = _value_problems(where, value, annotation, fields[name].metadata)
        problems += wrong
        if not wrong:
            values[name] = value
    try:
        return schema(**values), problems
    except ConfigError as err:  # a spec's own checks across its fields
        return schema(), [*problems, str(err)]


def to_data(config: Any) -> dict[str, Any]:
    """A schema instance as plain data (for config.yaml and checkpoints)."""
    return dataclasses.asdict(config)


def describe(schema: type, path: str = "") -> list[str]:
    """`key = default  help` lines for every field of a schema, nested blocks included."""
    lines = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        where = f"{path}.{f.name}" if path else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines += describe(hints[f.name], where)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        choices = f.metadata.get("choices")
        extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
        lines.append(f"  {where + '=' + _shown(default):<40} {f.metadata.get('help', '')}{extra}")
    return lines


def _shown(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
