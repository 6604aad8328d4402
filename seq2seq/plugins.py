"""Plugins: modules whose import registers components (tokenizers, embeddings, heads, datasets, metrics).

A config lists the plugin modules it needs under `plugins:`; they are imported before anything is built. An
installed package announces its plugin module in the `seq2seq.plugins` entry-point group::

    [project.entry-points."seq2seq.plugins"]
    g2p = "seq2seq_g2p"

and, when that module has a `conf/` folder, the folder joins Hydra's config search path, so its experiments and
group options are selectable by name (`seq2seq train experiment=g2p`). `seq2seq plugins` imports every announced
module and lists what each one registered.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

from seq2seq.errors import ConfigError
from seq2seq.registry import DATASETS, EMBEDDINGS, HEADS, METRICS, TOKENIZERS

GROUP = "seq2seq.plugins"


def announced() -> list[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=GROUP), key=lambda ep: ep.name)


def import_plugins(modules: list[str]) -> None:
    """Import plugin modules; their import registers their components. A module that fails to import is named."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:
            raise ConfigError(f"plugin module `{name}` failed to import: {type(err).__name__}: {err}. "
                              f"Is it installed (`pip install ...`)? Its provider: {provider(name)}") from err


_TRUSTED: set[str] = set()  # modules the user named for this process (`plugins=` of the inference commands)


def trust(modules: list[str]) -> None:
    """Import plugin modules the user named, and let checkpoints that record them import them too."""
    import_plugins(modules)
    _TRUSTED.update(modules)


def import_recorded(modules: list[str], source: str | Path) -> None:
    """Import the plugin modules a checkpoint or export records, refusing any that is neither installed as a seq2seq
    plugin (the entry-point group, or a module inside one) nor named by the user: a file must not choose what code
    runs."""
    allowed = {ep.value for ep in announced()} | _TRUSTED
    for name in modules:
        if not any(name == root or name.startswith(f"{root}.") for root in allowed):
            raise ConfigError(f"{source} records the plugin module `{name}`, which is not installed as a seq2seq "
                              f"plugin (entry-point group `{GROUP}`); it is not imported, since a checkpoint must "
                              f"not choose what code runs. If you trust it, name it: `plugins=[{name}]`")
    import_plugins(modules)


def import_announced() -> None:
    """Import every installed plugin (`seq2seq plugins` lists them all)."""
    import_plugins([ep.value for ep in announced()])


@functools.cache
def _distributions() -> Mapping[str, list[str]]:
    """Top-level module -> distributions; scanning them takes about 0.1 s, so once per process."""
    return metadata.packages_distributions()


def provider(module: str) -> str:
    """'distribution version' of the installed package that provides `module`, or 'not installed'."""
    dists = _distributions().get(module.split(".")[0], [])
    return f"{dists[0]} {metadata.version(dists[0])}" if dists else "not installed"


def plugin_versions(modules: list[str]) -> dict[str, str]:
    """What checkpoints record: each plugin module with the distribution and version providing it."""
    return {name: provider(name) for name in modules}


def search_path() -> list[str]:
    """Hydra search-path entries for the `conf/` folders of announced plugin modules, found and read without
    importing the modules: composing a config registers nothing that its `plugins:` do not name."""
    paths = []
    for ep in announced():
        spec = find_spec(ep.value)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            if (Path(folder) / "conf").is_dir():
                paths.append(f"file://{Path(folder) / 'conf'}")
    return paths


def searchpath_override() -> list[str]:
    """The Hydra override that adds the plugins' config folders (none when no plugin has one)."""
    paths = search_path()
    return [f"hydra.searchpath=[{','.join(paths)}]"] if paths else []


def listing() -> str:
    """Every registered component by kind: name, defining module, and the package and version it comes from; an
    announced plugin that fails to import is named with its error, and the others are listed all the same."""
    failed = []
    for ep in announced():
        try:
            import_plugins([ep.value])
        except ConfigError as err:
            cause = err.__cause__
            failed.append(f"  {ep.name:<16} {ep.value:<36} failed to import: {type(cause).__name__}: "
                          f"{str(cause).splitlines()[0] if str(cause) else ''}")
    lines = []
    for registry in (TOKENIZERS, EMBEDDINGS, HEADS, DATASETS, METRICS):
        lines.append(f"{registry.kind}s:")
        for name in registry.names():
            module = registry.get(name).__module__
            lines.append(f"  {name:<16} {module:<36} {provider(module)}")
    lines.append("announced plugins (entry-point group `seq2seq.plugins`):")
    lines += [f"  {ep.name:<16} {ep.value:<36} {provider(ep.value)}" for ep in announced()]
    if failed:
        lines += ["plugins that failed to import (their components are missing above):", *failed]
    return "\n".join(lines)
