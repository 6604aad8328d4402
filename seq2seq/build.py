"""Assembly from a config: the encoders (fitted on training pairs, or loaded from their state) and the model
(embeddings, core and head through the registries, weights tied as configured). Data preparation, the
LightningModule, testing and export build through here."""

from __future__ import annotations

from typing import Any

from seq2seq.domain import Encoder, Tokenizer
from seq2seq.embeddings import TokenEmbedding
from seq2seq.errors import ConfigError
from seq2seq.heads import TiedHead
from seq2seq.lora import add_adapters
from seq2seq.model import EncoderDecoder
from seq2seq.registry import DATASETS, EMBEDDINGS, HEADS, METRICS, TOKENIZERS
from seq2seq.schemas import TrainConfig


def fit_encoders(config: TrainConfig, train_pairs: list[tuple[Any, Any]]) -> tuple[Encoder, Encoder | None]:
    """Build the encoders named in config and fit them on the training pairs; no target encoder when the
    vocabulary is joint (`tokenizer.tgt: null`)."""
    specs = config.tokenizer
    src = TOKENIZERS.build(specs.src, where="tokenizer.src")
    sources, targets = [s for s, _ in train_pairs], [t for _, t in train_pairs]
    if specs.tgt is None:
        src.fit(sources + targets)
        return src, None
    tgt = TOKENIZERS.build(specs.tgt, where="tokenizer.tgt")
    src.fit(sources)
    tgt.fit(targets)
    return src, tgt


def fit_tokenizers(config: TrainConfig, train_pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The encoders named in config, fitted on the training pairs, as their plain-data state."""
    src, tgt = fit_encoders(config, train_pairs)
    return {"src": src.state_dict(), "tgt": None if tgt is None else tgt.state_dict()}


def load_tokenizers(config: TrainConfig, states: dict[str, Any]) -> tuple[Encoder, Tokenizer]:
    """The encoders of a config with their fitted state; the target side must be a `Tokenizer`."""
    specs = config.tokenizer
    src = TOKENIZERS.build(specs.src, where="tokenizer.src")
    src.load_state_dict(states["src"])
    tgt = src
    if specs.tgt is not None:
        tgt = TOKENIZERS.build(specs.tgt, where="tokenizer.tgt")
        tgt.load_state_dict(states["tgt"])
    for where, enc in (("tokenizer.src", src), ("tokenizer.tgt", tgt)):
        if not isinstance(enc, Encoder):
            raise ConfigError(f"`{where}` ({type(enc).__qualname__}) must subclass seq2seq.domain.Tokenizer or "
                              "FeatureEncoder")
    if not isinstance(tgt, Tokenizer):
        raise ConfigError(f"the target side needs a Tokenizer (ids), and `{type(tgt).__qualname__}` is a "
                          f"{type(tgt).__mro__[1].__name__}; set `tokenizer.tgt`")
    return src, tgt


def build_model(config: TrainConfig, src_tok: Encoder, tgt_tok: Tokenizer) -> EncoderDecoder:
    """Assemble embeddings, core and head from config; tie weights as configured; with `model.lora.rank`, LoRA
    adapters on a frozen model."""
    spec, d = config.model, config.model.d_model
    src_embed = EMBEDDINGS.build(config.embedding.src, "embedding.src", d_model=d, **src_tok.embedding_context())
    tgt_embed = src_embed
    if not spec.share_embeddings:
        tgt_embed = EMBEDDINGS.build(config.embedding.tgt or {}, "embedding.tgt", d_model=d,
                                     **tgt_tok.embedding_context())
    head = HEADS.build(config.head, "head", d_model=d, vocab_size=tgt_tok.vocab_size)
    if spec.tie_output:
        if not (isinstance(head, TiedHead) and isinstance(tgt_embed, TokenEmbedding)):
            raise ConfigError(f"`model.tie_output=true` needs a target `TokenEmbedding` and a `TiedHead`, and this "
                              f"config builds a {type(tgt_embed).__name__} and a {type(head).__name__}; set "
                              "`model.tie_output=false` for these components")
        head.tie(tgt_embed.weight)
    context = src_tok.embedding_context()
    if src_tok.future_steps and "n_features" not in context:
        raise ConfigError(f"`tokenizer.src` ({type(src_tok).__name__}) declares known-future rows, which only a "
                          "FeatureEncoder (feature values) can give")
    model = EncoderDecoder(spec, src_embed, tgt_embed, head, future_steps=src_tok.future_steps,
                           n_features=context.get("n_features", 0))
    if spec.lora.rank:
        add_adapters(model, spec.lora)
    return model


def component_modules(config: TrainConfig) -> list[str]:
    """The modules that define the components a config builds (what a checkpoint must import to load)."""
    blocks = [(DATASETS, config.data), (TOKENIZERS, config.tokenizer.src), (EMBEDDINGS, config.embedding.src),
              (HEADS, config.head), *((METRICS, {"name": m}) for m in config.metrics)]
    blocks += [(TOKENIZERS, config.tokenizer.tgt), (EMBEDDINGS, config.embedding.tgt)]
    modules = {registry.get(spec["name"]).__module__ for registry, spec in blocks if spec}
    return sorted(m for m in modules if m.split(".")[0] != "seq2seq")  # the core imports its own
