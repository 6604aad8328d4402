"""Paths the user names for a command to write: checked before any work, written whole.

The rules every writing command follows (prepare, train, export, average, translate, predict, evaluate):
- what is there and was not written by seq2seq is never removed or overwritten, unless `force=true` says so; seq2seq
  recognises its own outputs by their metadata (a prepared dataset's meta.json, an export's manifest, a checkpoint's
  config, the `<file>.json` beside predictions, an evaluation's metrics.json), and a folder of its own that holds
  other files too counts as not its own;
- an output that is one of the command's inputs, or a folder holding one, is refused (links resolved), even forced;
- a missing or read-only parent folder is refused before any work;
- files are written beside their target and renamed into place, so a failed write leaves the previous file whole.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from seq2seq.errors import ConfigError, StorageError, some

FORCE_HELP = "replace what is at the output even when seq2seq did not write it"


STORAGE_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM)


@contextmanager
def storage(what: str, path: str | Path, kept: str) -> Iterator[None]:
    """Turns a write that the disk refuses (full, over quota, read-only) into one message naming the path, how much
    room is left there, and `kept`: what the failed write left as it was."""
    try:
        yield
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise
        folder = Path(path).resolve()
        while not folder.exists():
            folder = folder.parent
        free = shutil.disk_usage(folder).free
        raise StorageError(f"cannot write {what} {path}: {err.strerror} ({free / 2**20:,.0f} MiB free there); "
                           f"{kept}. Free some space, or write elsewhere") from None


def _described(names: list[str]) -> str:
    return some(sorted(names), 5)


def refuse_inputs(key: str, output: str | Path, inputs: Iterable[str | Path]) -> None:
    """A ConfigError when `output` is one of `inputs` or a folder holding one."""
    target = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if source == target or target in source.parents:
            what = "is" if source == target else "holds"
            raise ConfigError(f"`{key}={output}` {what} the input {given}: writing there would destroy it; "
                              "choose another path")


def _check_parent(key: str, path: Path) -> None:
    parent = path.parent
    while not parent.exists():  # a folder to create: the first existing ancestor must take it
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"`{key}={path}`: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"`{key}={path}`: the folder {parent} is not writable; choose another path")


def check_file(key: str, path: str | Path, ours: Callable[[Path], bool], force: bool,
               parent_must_exist: bool = True) -> Path:
    """`path` as a file this command may write: absent, or recognised by `ours`, or `force`d."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"`{key}={path}` is a folder; name a file")
    if parent_must_exist and not path.parent.is_dir():
        raise ConfigError(f"`{key}={path}`: the folder {path.parent} does not exist; create it first")
    if path.exists() and not force and not ours(path):
        raise ConfigError(f"`{key}={path}` exists and was not written by seq2seq; choose another path, or add "
                          "`force=true` to replace it")
    _check_parent(key, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"`{key}={path}` is read-only; choose another path")
    return path


def check_folder(key: str, path: str | Path, owned: Callable[[Path], set[str]], force: bool) -> Path:
    """`path` as a folder this command may replace: absent or empty, or holding only what `owned` says seq2seq
    wrote there, or `force`d."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"`{key}={path}` is a file; name a folder")
    if path.is_dir() and not force:
        foreign = sorted({p.name for p in path.iterdir()} - owned(path))
        if foreign:
            raise ConfigError(f"`{key}={path}` holds {len(foreign)} file(s) seq2seq did not write there "
                              f"({_described(foreign)}); choose another folder, or add `force=true` to replace "
                              "the folder and everything in it")
    _check_parent(key, path)
    return path


def json_sidecar(path: Path) -> Path:
    """Where a text output's metadata goes: `<file>.json`."""
    return path.with_name(path.name + ".json")


def read_json(path: Path) -> dict | None:
    """A JSON object from `path`, or None when it is missing or not one."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_our_text(path: Path) -> bool:
    """Whether `path` holds outputs of `translate` or `predict` (their `<file>.json` names the checkpoint)."""
    meta = read_json(json_sidecar(path))
    return meta is not None and "checkpoint" in meta


@contextmanager
def atomic_write(path: str | Path, binary: bool = False) -> Iterator[TextIO]:
    """A file written beside `path` and renamed onto it when the block ends without an error."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    kept = "the file there before is intact" if path.exists() else "nothing was written"
    try:
        with storage("the file", path, kept), \
                open(partial, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def remove(path: Path) -> None:
    """A file, or a folder with what it holds, if it is there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_folder(complete: Path, dest: Path) -> None:
    """Put the folder `complete` in place of `dest` (a folder or a file), whose old contents are removed only once it
    is there: until then they wait beside it as `<dest>.old-<pid>`."""
    old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
    if dest.exists():
        dest.rename(old)
    complete.rename(dest)
    remove(old)
