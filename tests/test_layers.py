"""The layering of docs/architecture.md, enforced: every import of `seq2seq/` and `plugins/` (top-level,
function-local and TYPE_CHECKING alike) points down or across a layer, never up, and none closes a circle."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PLUGIN_LAYER = 3  # the highest layer a plugin may import


def layers(text: str) -> dict[str, int]:
    """Module (without the `seq2seq.` prefix) -> layer, from the numbered list of docs/architecture.md."""
    found = {}
    for number, names in re.findall(r"^(\d+)\. (.*?) —", text, re.M):
        for name in re.findall(r"`([\w.]+)`", names):
            found[name] = int(number)
    return found


def imports(path: Path) -> set[str]:
    """The seq2seq modules a file imports anywhere in it, without the `seq2seq.` prefix (`from seq2seq import x`
    counts as importing `x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "seq2seq":
                found |= {alias.name for alias in node.names}
            elif node.module.startswith("seq2seq."):
                found.add(node.module.removeprefix("seq2seq."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("seq2seq.") for a in node.names if a.name.startswith("seq2seq.")}
    return found


def core_graph() -> dict[str, set[str]]:
    graph = {}
    for path in sorted((ROOT / "seq2seq").rglob("*.py")):
        parts = path.relative_to(ROOT / "seq2seq").with_suffix("").parts
        name = ".".join(parts).removesuffix(".__init__").removesuffix("__init__") or "seq2seq"
        graph[name] = imports(path)
    return graph


def upward(graph: dict[str, set[str]], layer: dict[str, int]) -> list[str]:
    """Every import that points to a higher layer, as 'importer (n) -> imported (m)'."""
    return [f"{a} ({layer[a]}) -> {b} ({layer[b]})" for a, targets in graph.items() for b in sorted(targets)
            if b in layer and a in layer and layer[b] > layer[a]]


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of the graph (one path each), by depth-first search."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


LAYERS = layers((ROOT / "docs" / "architecture.md").read_text())


def test_every_module_has_a_layer():
    assert set(core_graph()) - set(LAYERS) == set()


def test_no_core_import_points_up_or_closes_a_circle():
    graph = core_graph()
    assert upward(graph, LAYERS) == []
    assert circles(graph) == []


def test_plugins_import_the_contract_only():
    reaching = {f"{path.relative_to(ROOT)} -> {name}" for path in (ROOT / "plugins").rglob("*.py")
                for name in imports(path) if LAYERS.get(name, 99) > PLUGIN_LAYER}
    assert reaching == set()


@pytest.mark.parametrize(("source", "arrow"), [
    ("from seq2seq.training import train\n", "domain (2) -> training (11)"),
    ("def hook():\n    from seq2seq.translate import Translator\n", "domain (2) -> translate (9)"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from seq2seq import config\n",
     "domain (2) -> config (6)"),
])
def test_an_upward_import_anywhere_in_a_file_is_found(tmp_path, source, arrow):
    graph = core_graph()
    added = tmp_path / "domain.py"
    added.write_text((ROOT / "seq2seq" / "domain.py").read_text() + "\n" + source)
    graph["domain"] = imports(added)
    assert upward(graph, LAYERS) == [arrow]
    assert circles(graph)  # and it closes a circle through the module it reaches


def test_the_layer_list_reads_every_numbered_line():
    assert LAYERS["errors"] == 1 and LAYERS["training"] == 11 and LAYERS["export.onnx"] == 9
    assert max(LAYERS.values()) == 12
