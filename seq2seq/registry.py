"""Registries: the extension points of the framework, declared together.

A registered constructor takes flat, typed keyword arguments; its signature *is* the schema of its YAML block.
A block names the component and gives its options::

    tokenizer:
      src: {name: symbols}

Values the framework owns (``d_model``, ``vocab_size``, ...) are passed as *context* when building. A constructor
receives the context values its signature asks for; an option that duplicates a context value is rejected, so
those values never get copied into YAML.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from seq2seq.errors import ConfigError, excerpt
from seq2seq.schema import hint, type_ok

T = TypeVar("T", bound=Callable[..., Any])


def _origin(obj: object) -> str:
    return f"{obj.__module__}.{getattr(obj, '__qualname__', repr(obj))}"


class Registry:
    """Named constructors of one kind of component (tokenizer, embedding, head, ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(fn: T) -> T:
            known = self._entries.get(name)
            if known is not None and _origin(known) != _origin(fn):
                raise ValueError(
                    f"{self.kind} `{name}` is defined twice: by {_origin(known)} and by {_origin(fn)}; "
                    "rename one of them"
                )
            self._entries[name] = fn
            return fn

        return add

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            raise ConfigError(
                f"unknown {self.kind} `{name}`.{hint(name, self._entries)} "
                f"Registered {self.kind}s: {', '.join(self.names()) or '(none)'}. "
                "If it comes from a plugin, list the plugin module under `plugins:`."
            )
        return self._entries[name]

    def check(self, spec: Mapping[str, Any], context: Iterable[str], where: str) -> None:
        """Validate a YAML block against the constructor signature without building anything."""
        if "name" not in spec:
            raise ConfigError(f"`{where}` needs a `name`: one of {', '.join(self.names())}")
        name = spec["name"]
        params = inspect.signature(self.get(name), eval_str=True).parameters
        context = set(context)
        accepted = [p for p in params if p not in context]
        for key, value in spec.items():
            if key == "name":
                continue
            if key in context:
                raise ConfigError(f"`{where}.{key}` is set by the framework for {self.kind} `{name}`; remove it")
            if key not in params:
                raise ConfigError(
                    f"unknown option `{where}.{key}` for {self.kind} `{name}`.{hint(key, accepted)} "
                    f"Accepted options: {', '.join(accepted) or '(none)'}"
                )
            if not type_ok(value, params[key].annotation):
                raise ConfigError(
                    f"`{where}.{key}` must be {params[key].annotation}, got {excerpt(value)} ({type(value).__name__})"
                )
        missing = [
            p for p, param in params.items()
            if param.default is inspect.Parameter.empty and p not in context and p not in spec
        ]
        if missing:
            raise ConfigError(f"{self.kind} `{name}` needs option(s) {', '.join(missing)} under `{where}`")

    def with_defaults(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """A block with every option its constructor has, the defaults filled in (context values left out)."""
        params = inspect.signature(self.get(spec["name"]), eval_str=True).parameters
        return {"name": spec["name"], **{p: v.default for p, v in params.items()
                                         if v.default is not inspect.Parameter.empty}, **spec}

    def build(self, spec: Mapping[str, Any], where: str = "", **context: Any) -> Any:
        """Check `spec` then call the constructor with its options and the context values it asks for."""
        where = where or self.kind
        self.check(spec, context, where)
        fn = self.get(spec["name"])
        params = inspect.signature(fn, eval_str=True).parameters
        options = {k: v for k, v in spec.items() if k != "name"}
        return fn(**{k: v for k, v in context.items() if k in params}, **options)


TOKENIZERS = Registry("tokenizer")
EMBEDDINGS = Registry("embedding")
HEADS = Registry("head")
DATASETS = Registry("dataset")
METRICS = Registry("metric")
