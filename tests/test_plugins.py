"""Plugin discovery: entry points, config search path, the listing, and what checkpoints record of plugins."""

import logging
from importlib import metadata

import pytest
import torch
from conftest import cli

from seq2seq import plugins, testing
from seq2seq.errors import ConfigError
from seq2seq.module import Seq2SeqModule
from seq2seq.plugins import GROUP, announced, import_plugins, listing, plugin_versions, search_path


def test_built_in_domains_are_announced_like_any_installed_plugin():
    assert {"synthetic", "series", "text"} <= {ep.name for ep in announced()}
    lines = listing().splitlines()
    assert any(line.split()[:2] == ["bpe", "seq2seq_plugins.text.tokenizers"] and "seq2seq" in line
               for line in lines)
    assert any(line.split()[:2] == ["token", "seq2seq.embeddings"] for line in lines)


def test_the_cli_lists_plugins():
    out = cli("plugins")
    assert out.returncode == 0, out.stderr
    assert "tokenizers:" in out.stdout and "windows" in out.stdout


def test_a_plugin_with_a_conf_folder_joins_the_search_path():
    # The example plugin (examples/g2p) is installed with the dev setup; its conf/ makes `experiment=g2p` exist.
    # Found by location, not by importing the plugin: composing must register nothing it does not name.
    assert any(p.startswith("file://") and p.endswith("seq2seq_g2p/conf") for p in search_path())


def test_a_plugin_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('missing weights file')\n")
    monkeypatch.syspath_prepend(tmp_path)
    with pytest.raises(ConfigError, match="plugin module `broken_plugin` failed to import: RuntimeError: missing"):
        import_plugins(["broken_plugin"])


def test_the_listing_names_a_plugin_that_fails_to_import_in_one_line_and_lists_the_others(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('missing weights file')\n")
    monkeypatch.syspath_prepend(tmp_path)
    broken = metadata.EntryPoint("broken", "broken_plugin", GROUP)
    monkeypatch.setattr(plugins, "announced", lambda: sorted([*announced(), broken], key=lambda ep: ep.name))
    lines = listing().splitlines()
    assert any(line.split()[:2] == ["bpe", "seq2seq_plugins.text.tokenizers"] for line in lines)
    failure = f"  {'broken':<16} {'broken_plugin':<36} failed to import: RuntimeError: missing weights file"
    assert lines[-2:] == ["plugins that failed to import (their components are missing above):", failure]


def test_checkpoints_record_plugin_versions_and_warn_when_they_changed(tmp_path, caplog):
    module, pairs = testing.build(["experiment=reverse", "model=tiny"])
    path = tmp_path / "one-step.ckpt"
    testing.fit(module, pairs, 1, tmp_path).save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["seq2seq"]["plugins"] == plugin_versions(["seq2seq_plugins.synthetic"])
    ckpt["seq2seq"]["plugins"]["seq2seq_plugins.synthetic"] = "seq2seq 0.0.1"
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING):
        Seq2SeqModule.from_checkpoint(path)
    assert "was seq2seq 0.0.1 when the checkpoint was written" in caplog.text


def test_the_reader_hooks_the_plugin_guide_documents_have_the_codes_signatures():
    import inspect
    import re
    from pathlib import Path

    from seq2seq.domain import Reader

    text = " ".join((Path(__file__).parents[1] / "docs" / "plugins.md").read_text().split())
    documented = {name: [a.strip() for a in args.split(",") if a.strip()]
                  for name, args in re.findall(r"`(\w+)\(([\w, ]*)\)", text) if callable(getattr(Reader, name, None))}
    assert {"report", "write_predictions", "plot_attention", "write_sample", "target_length"} <= set(documented)
    for name, args in documented.items():
        assert args == list(inspect.signature(getattr(Reader, name)).parameters)[1:], name
