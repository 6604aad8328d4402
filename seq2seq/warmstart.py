"""A run that starts from a checkpoint's weights (`init=CKPT`): an imported pretrained model (`seq2seq import`) or
another run's. The checkpoint gives the architecture and the fitted tokenizers (its `model`, `tokenizer`,
`embedding` and `head` blocks, vocabulary kept); the run gives everything else (data, optimizer, trainer,
decoding), and of the `model` block only what does not change a shape: dropouts, compile, activation checkpointing
and LoRA adapters. A command-line override of the architecture that disagrees with the checkpoint is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, TypeVar

from seq2seq.checkpoints import read_checkpoint
from seq2seq.errors import ConfigError
from seq2seq.plugins import import_recorded
from seq2seq.schema import build, join, to_data
from seq2seq.schemas import TrainConfig

log = logging.getLogger("seq2seq")
T = TypeVar("T", bound=TrainConfig)

ARCHITECTURE = ("tokenizer", "embedding", "head")  # blocks taken whole from the checkpoint
TRAINING_KEYS = ("dropout", "attention_dropout", "activation_dropout", "compile", "checkpoint_activations", "lora")


def _conflicts(stored: dict[str, Any], overrides: list[str]) -> list[str]:
    """The command-line overrides that set an architecture key to something other than the checkpoint's."""
    found = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        block, _, rest = key.partition(".")
        if block in ARCHITECTURE or (block == "model" and rest.split(".")[0] not in TRAINING_KEYS):
            have: Any = stored
            for part in key.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if str(have).lower() != value.strip("'\"").lower():
                found.append(f"`{key}={value}` (the checkpoint's is {have})")
    return found


def from_init(config: T, overrides: list[str] = ()) -> tuple[T, dict[str, Any], dict[str, Any]]:
    """The run's config with the checkpoint `config.init`'s architecture, its tokenizers' state, and its model's
    weights (`EncoderDecoder` names, without adapters: a LoRA checkpoint's merged weights are its run's to give)."""
    ckpt = read_checkpoint(config.init)
    recorded = list(ckpt.get("seq2seq", {}).get("plugins", {}))
    import_recorded(recorded, config.init)
    stored = ckpt["hyper_parameters"]["config"]
    conflicts = _conflicts(stored, list(overrides))
    if conflicts:
        raise ConfigError(f"`init={config.init}` gives the architecture and tokenizers, and the command line changes "
                          f"them: {'; '.join(conflicts)}. Leave these out (dropouts, compile, "
                          "checkpoint_activations and lora may change)")
    data = to_data(config)
    data["init"] = str(Path(config.init).resolve())  # a LoRA checkpoint loads its base from here, from anywhere
    for block in ARCHITECTURE:
        data[block] = stored[block]
    data["model"] = {**stored["model"], **{k: data["model"][k] for k in TRAINING_KEYS}}
    data["plugins"] = list(dict.fromkeys([*data["plugins"], *stored["plugins"]]))
    started, problems = build(type(config), data)
    if problems:
        raise ConfigError(f"`init={config.init}`: {join(problems)}")
    state = {name.removeprefix("model."): value for name, value in ckpt["state_dict"].items()
             if name.startswith("model.")}
    if stored["model"].get("lora", {}).get("rank"):
        raise ConfigError(f"`init={config.init}` holds LoRA adapters over another checkpoint; merge them first "
                          f"(`seq2seq average ckpts=[{config.init}] output=merged.ckpt` writes the merged weights) "
                          "and start from that")
    log.info("starting from %s: its architecture, tokenizers and weights", config.init)
    return started, ckpt["hyper_parameters"]["tokenizers"], state
