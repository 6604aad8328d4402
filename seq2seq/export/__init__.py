"""Exported models: `seq2seq export` writes a folder that decodes without the checkpoint, in CTranslate2 or ONNX.

The folder is self-contained: the backend's files (`model.bin`, `config.json` and vocabularies for CTranslate2;
`encoder.onnx` and `decoder_step.onnx`, plus `forward.onnx` for label domains, for ONNX), `module.pt` (the
training config and the fitted tokenizers as plain data) and `seq2seq_export.json` (format, quantization, the source
checkpoint and the parity report). `seq2seq.exporting` writes it; `Translator.from_checkpoint(folder)` (and every
command's `ckpt=folder`) loads it through `load_export` here. Dependencies: the `deploy` extra (ctranslate2, onnx,
onnxscript, onnxruntime).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from seq2seq.backends import Backend, Stepped
from seq2seq.config import load_train_config
from seq2seq.errors import ConfigError
from seq2seq.module import Seq2SeqModule
from seq2seq.plugins import import_recorded

MANIFEST, MODULE = "seq2seq_export.json", "module.pt"
FORMATS = ("ctranslate2", "onnx")
ENGINES = {"ctranslate2": ("ctranslate2",), "onnx": ("onnx", "onnxscript", "onnxruntime")}  # what each needs
QUANTIZATIONS = {"ctranslate2": ("none", "int8", "int8_float32", "bfloat16"), "onnx": ("none",)}


def require(packages: tuple[str, ...], extra: str) -> None:
    """A ConfigError naming the extra to install when one of `packages` is missing."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} not installed: pip install 'seq2seq[{extra}]'")


def is_export(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _module(path: Path) -> Seq2SeqModule:
    """The exported model's config and tokenizers; its weights live in the backend, so the model is built on the
    meta device (no memory, no initialisation)."""
    saved = torch.load(path / MODULE, weights_only=True)
    import_recorded(list(saved["config"].get("plugins", [])), path)
    config = load_train_config(saved["config"])
    with torch.device("meta"):
        return Seq2SeqModule(config, saved["tokenizers"]).eval()


def load_export(path: str | Path, threads: int | None = None) -> tuple[Seq2SeqModule, Backend]:
    """The exported model in `path`: its module (config and tokenizers, no weights) and the backend that runs it
    (`Translator.from_checkpoint` takes the folder)."""
    path = Path(path)
    manifest = json.loads((path / MANIFEST).read_text())
    require(ENGINES[manifest["format"]], "deploy")
    module = _module(path)
    spec = module.model.spec
    if manifest["format"] == "onnx":
        from seq2seq.export.onnx import OnnxModel

        graphs = OnnxModel(path, spec.n_decoder_layers, spec.n_kv_heads or spec.n_heads, spec.d_model // spec.n_heads,
                           threads)
        backend: Backend = Stepped(graphs, "onnx")
    else:
        from seq2seq.export.ctranslate2 import CTranslate2Model

        backend = CTranslate2Model(path, module.src_tok, module.tgt_tok, f"ctranslate2 {manifest['quantization']}",
                                   threads)
    return module, backend
