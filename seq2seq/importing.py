"""`seq2seq import`: a pretrained Hugging Face translation model (a local folder of `MarianMTModel` or
`M2M100ForConditionalGeneration`: config.json, safetensors or .bin weights, tokenizer files) as a seq2seq checkpoint,
checked against transformers before it is written.

These models are the paper's Transformer with a handful of conventions, each a `model:` option of the core:

| convention                    | Marian (OPUS-MT)                  | M2M-100, NLLB                          |
|-------------------------------|-----------------------------------|----------------------------------------|
| Add & Norm                    | post-norm                         | pre-norm, final norms                  |
| sinusoid layout, first position | halves, 0                       | fairseq, 2                             |
| feed-forward activation       | swish (`silu`)                    | relu                                   |
| output layer                  | tied, with a bias (`final_logits_bias`) | tied                             |
| decoder starts from           | `<pad>`                           | `</s>`, then the target language token |

Every tensor of the folder is mapped or refused by name; so is any setting the core cannot express. Parity before
writing: the tokenization, the teacher-forced logits (within `tolerance`) and the greedy and beam-search tokens
of transformers on the same inputs.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from seq2seq.checkpoints import AtomicCheckpointIO, is_checkpoint
from seq2seq.config import load_train_config
from seq2seq.errors import ConfigError, some
from seq2seq.export import require
from seq2seq.module import Seq2SeqModule
from seq2seq.outputs import check_file, refuse_inputs
from seq2seq.plugins import import_plugins
from seq2seq.schemas import ImportConfig
from seq2seq.translate import Translator

log = logging.getLogger("seq2seq")

# model_type -> what differs between the families (the table above)
FAMILIES: dict[str, dict[str, Any]] = {
    "marian": {"tokenizer": "marian", "norm_first": False, "sinusoid": "halves", "position_offset": 0,
               "logits_bias": True},
    "m2m_100": {"tokenizer": "nllb", "norm_first": True, "sinusoid": "fairseq", "position_offset": 2,
                "logits_bias": False},
}
ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}
PLUGIN = "seq2seq_plugins.text"  # the tokenizers of these models
SENTENCES = ["새 문서를 만듭니다.", "The weather is nice today.", "Le chat dort sur le canapé.",
             "Das ist ein kurzer Satz.", "Numbers like 42 and 3.14 stay.", "¿Dónde está la estación?"]


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise ConfigError(f"`hf={folder}` has no config.json: give the folder of a Hugging Face model "
                          "(`huggingface-cli download Helsinki-NLP/opus-mt-ko-en --local-dir DIR` writes one)")
    hf = json.loads(path.read_text())
    if hf.get("model_type") not in FAMILIES:
        raise ConfigError(f"`hf={folder}`: model_type {hf.get('model_type')!r} cannot be imported; seq2seq imports "
                          f"{', '.join(FAMILIES)} (MarianMTModel, M2M100ForConditionalGeneration)")
    return hf


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of the folder's weights (safetensors, or a PyTorch .bin read with weights_only)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConfigError(f"`hf={folder}` holds no model.safetensors or pytorch_model.bin")
    weights: dict[str, Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            weights.update(load_file(file))
        else:
            weights.update(torch.load(file, map_location="cpu", weights_only=True))
    return {name.removeprefix("model."): tensor.float() for name, tensor in weights.items()}


def _same(hf: dict[str, Any], *keys: str) -> Any:
    values = {hf.get(k) for k in keys}
    if len(values) != 1:
        raise ConfigError(f"the model's {' and '.join(keys)} differ ({', '.join(str(hf.get(k)) for k in keys)}); "
                          "the core has one value for both")
    return values.pop()


def model_block(hf: dict[str, Any]) -> dict[str, Any]:
    """The core's `model:` block for a Hugging Face config; a setting it cannot express is refused by name."""
    family = FAMILIES[hf["model_type"]]
    activation = hf.get("activation_function", "relu")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation_function {activation!r} has no counterpart in the core "
                          f"({', '.join(ACTIVATIONS)} do)")
    if not hf.get("scale_embedding", False):
        raise ConfigError("scale_embedding=false: the core always scales embeddings by √d_model, as the paper does")
    if not hf.get("share_encoder_decoder_embeddings", True) or hf.get("decoder_vocab_size", hf["vocab_size"]) != \
            hf["vocab_size"]:
        raise ConfigError("separate source and target vocabularies (share_encoder_decoder_embeddings=false) cannot "
                          "be imported yet; the core imports models with one shared vocabulary")
    if not hf.get("tie_word_embeddings", True):
        raise ConfigError("tie_word_embeddings=false: the imported families tie the output layer to the embedding")
    return {
        "d_model": hf["d_model"], "n_heads": _same(hf, "encoder_attention_heads", "decoder_attention_heads"),
        "n_encoder_layers": hf["encoder_layers"], "n_decoder_layers": hf["decoder_layers"],
        "d_ff": _same(hf, "encoder_ffn_dim", "decoder_ffn_dim"), "dropout": hf.get("dropout", 0.1),
        "attention_dropout": hf.get("attention_dropout", 0.0),
        "activation_dropout": hf.get("activation_dropout", 0.0), "activation": ACTIVATIONS[activation],
        "norm_first": family["norm_first"], "positions": "sinusoidal", "sinusoid": family["sinusoid"],
        "position_offset": family["position_offset"], "max_positions": hf["max_position_embeddings"],
        "tie_output": True, "share_embeddings": True,
    }


def _attention(out: dict[str, Tensor], ours: str, theirs: str, take) -> None:
    out[f"{ours}.in_proj.weight"] = torch.cat([take(f"{theirs}.{p}_proj.weight") for p in "qkv"])
    out[f"{ours}.in_proj.bias"] = torch.cat([take(f"{theirs}.{p}_proj.bias") for p in "qkv"])
    out[f"{ours}.out_proj.weight"], out[f"{ours}.out_proj.bias"] = (take(f"{theirs}.out_proj.{p}")
                                                                    for p in ("weight", "bias"))


def _pair(out: dict[str, Tensor], ours: str, theirs: str, take) -> None:
    out[f"{ours}.weight"], out[f"{ours}.bias"] = take(f"{theirs}.weight"), take(f"{theirs}.bias")


def _layer(out: dict[str, Tensor], side: str, i: int, take) -> None:
    ours, theirs = f"{side}.{i}", f"{side}.layers.{i}"
    _attention(out, f"{ours}.self_attn", f"{theirs}.self_attn", take)
    norms = ("self_attn", "final") if side == "encoder" else ("self_attn", "encoder_attn", "final")
    if side == "decoder":
        _attention(out, f"{ours}.cross_attn", f"{theirs}.encoder_attn", take)
    for k, norm in enumerate(norms):
        _pair(out, f"{ours}.norms.{k}", f"{theirs}.{norm}_layer_norm", take)
    _pair(out, f"{ours}.ff.w1", f"{theirs}.fc1", take)
    _pair(out, f"{ours}.ff.w2", f"{theirs}.fc2", take)


def _shared_embedding(weights: dict[str, Tensor], take) -> Tensor:
    """The one embedding of source, target and output layer; a copy that differs is refused."""
    embedding = take("shared.weight") if "shared.weight" in weights else take("encoder.embed_tokens.weight")
    for copy in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
        if copy in weights and not torch.equal(take(copy), embedding):
            raise ConfigError(f"{copy} differs from the shared embedding: the model is not tied as its config says")
    return embedding


def map_weights(weights: dict[str, Tensor], spec: dict[str, Any]) -> dict[str, Tensor]:
    """Hugging Face tensor names -> the core's (`EncoderDecoder.state_dict`). Every tensor is used, or is a
    sinusoid table the core computes, or a copy of the shared embedding; anything else is refused by name."""
    used: set[str] = set()

    def take(name: str) -> Tensor:
        if name not in weights:
            raise ConfigError(f"the model's weights have no {name}")
        used.add(name)
        return weights[name]

    embedding = _shared_embedding(weights, take)
    out = dict.fromkeys(("src_embed.embed.weight", "tgt_embed.embed.weight", "head.proj.weight"), embedding)
    if "final_logits_bias" in weights:
        out["head.proj.bias"] = take("final_logits_bias").reshape(-1)
    for side in ("encoder", "decoder"):
        for i in range(spec[f"n_{side}_layers"]):
            _layer(out, side, i, take)
        if spec["norm_first"]:
            _pair(out, f"{side}_norm", f"{side}.layer_norm", take)
    left = sorted(n for n in weights.keys() - used if not n.endswith("embed_positions.weight"))
    if left:
        raise ConfigError(f"the model has tensors the core has no place for: {some(left, 8)}")
    return out


def train_config(hf: dict[str, Any], target_lang: str | None, source_lang: str | None) -> dict[str, Any]:
    """The checkpoint's config: the model's architecture and tokenizers; data, training and decoding settings
    are the defaults a fine-tuning run overrides."""
    family = FAMILIES[hf["model_type"]]
    name = family["tokenizer"]
    langs = {"target_lang": target_lang} | ({"source_lang": source_lang} if name == "nllb" else {})
    return {
        "plugins": [PLUGIN], "model": model_block(hf), "data": {"name": "parallel"},
        "tokenizer": {"src": {"name": name, "side": "source", **langs}, "tgt": {"name": name, "side": "target",
                                                                              **langs}},
        "embedding": {"src": {"name": "token"}, "tgt": {"name": "token"}},
        "head": {"name": "linear", "bias": family["logits_bias"]},
        "metrics": ["bleu", "chrf"], "monitor": {"metric": "val/bleu", "mode": "max"},
        "decode": {"beam": 4, "max_len_a": 1.5, "max_len_b": 10, "length_normalization": "average"},
    }


def build_module(folder: Path, hf: dict[str, Any], target_lang: str | None, source_lang: str | None
                 ) -> Seq2SeqModule:
    """The imported model as a module: the config, the tokenizers read from the folder, the mapped weights."""
    import_plugins([PLUGIN])
    from seq2seq.registry import TOKENIZERS

    data = train_config(hf, target_lang, source_lang)
    config = load_train_config(data)
    states = {}
    for side in ("src", "tgt"):
        tok = TOKENIZERS.build(data["tokenizer"][side], where=f"tokenizer.{side}")
        tok.load_pretrained(folder)
        states[side] = tok.state_dict()
    module = Seq2SeqModule(config, states)
    if module.tgt_tok.vocab_size != hf["vocab_size"]:
        raise ConfigError(f"the tokenizer's vocabulary has {module.tgt_tok.vocab_size} tokens and the model's "
                          f"embedding {hf['vocab_size']}; the folder's files do not belong together")
    module.model.load_state_dict(map_weights(read_weights(folder), data["model"]))
    return module.eval()


def check_parity(folder: Path, translator: Translator, sentences: list[str], tolerance: float,
                 max_new: int = 24) -> dict[str, Any]:
    """The imported model against transformers on `sentences`, batch by batch: token ids; greedy and beam-4 tokens
    (`max_new` at most, GNMT-free length normalization, EOS may come at any step); teacher-forced logits on
    transformers' greedy outputs, whose largest absolute difference must be at most `tolerance`. A ConfigError says
    what differs, and where."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    theirs = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32).eval()
    langs = {k: getattr(translator.src_tok, k) for k in ("source_lang", "target_lang")
             if getattr(translator.src_tok, k, None)}  # NLLB's
    hf_ids = AutoTokenizer.from_pretrained(folder, **{k[:3] + "_lang": v for k, v in langs.items()})(
        sentences)["input_ids"]
    for sentence, ids in zip(sentences, hf_ids, strict=True):
        if (ours := translator.src_tok.encode(sentence).tolist()) != ids:
            raise ConfigError(f"tokenization differs from transformers' on {sentence!r}: {ours} vs {ids}")
    translator = translator.with_decoding(max_len_a=0.0, max_len_b=max_new)
    diff = 0.0
    for idx, batch in translator.batches(sentences):
        diff = max(diff, _batch_parity(theirs, translator, [sentences[i] for i in idx], batch, max_new))
    if not diff <= tolerance:
        raise ConfigError(f"teacher-forced logits differ from transformers' by up to {diff:.3g} (tolerance "
                          f"{tolerance:g})")
    return {"sentences": len(sentences), "max_logit_difference": diff}


@torch.no_grad()
def _batch_parity(theirs: Any, translator: Translator, ordered: list[str], batch: Any, max_new: int) -> float:
    """One batch of `check_parity`: its searches compared, then its largest teacher-forced logit difference."""
    tok = translator.tgt_tok
    inputs = {"input_ids": batch.src, "attention_mask": batch.src_keep.long()}
    forced = {"forced_bos_token_id": tok.forced_prefix[0]} if tok.forced_prefix else {}
    for beam in (4, 1):
        search = {"num_beams": beam, "length_penalty": 1.0, "early_stopping": False} if beam > 1 else {}
        generated = theirs.generate(**inputs, **search, **forced, do_sample=False, max_new_tokens=max_new,
                                    suppress_tokens=[tok.pad_id], forced_eos_token_id=None).tolist()
        bodies = [[t for t in row[1:] if t != tok.pad_id] for row in generated]  # after the decoder's start
        want = [body[: body.index(tok.eos_id)] if tok.eos_id in body else body for body in bodies]
        got = translator.with_decoding(beam=beam).tokens(ordered)
        for sentence, a, b in zip(ordered, got, want, strict=True):
            if a != b:
                raise ConfigError(f"beam {beam}: tokens differ from transformers' on {sentence!r}: {a} vs {b}")
    # Teacher-forced, on what transformers decoded greedily (the last search).
    tgt_in = torch.full((len(want), 1 + max(map(len, want))), tok.pad_id)
    keep = torch.zeros_like(tgt_in, dtype=torch.bool)
    for row, ids in enumerate(want):
        tgt_in[row, : 1 + len(ids)] = torch.tensor([generated[row][0], *ids])
        keep[row, : 1 + len(ids)] = True
    mine = translator.module.model(batch.src, batch.src_keep, tgt_in, keep)
    hf_logits = theirs(**inputs, decoder_input_ids=tgt_in, decoder_attention_mask=keep.long()).logits
    return float((mine - hf_logits)[keep].abs().max())


def import_model(config: ImportConfig) -> Path:
    """Read `config.hf`, check parity with transformers, write the checkpoint `config.output`."""
    require(("transformers", "safetensors"), "hf")
    folder = Path(config.hf)
    hf = read_config(folder)
    refuse_inputs("output", config.output, [*folder.iterdir(), *([config.sentences] if config.sentences else [])])
    output = check_file("output", config.output, is_checkpoint, config.force)
    sentences = SENTENCES
    if config.sentences:
        if not Path(config.sentences).is_file():
            raise ConfigError(f"`sentences={config.sentences}`: no such file")
        sentences = [line for line in Path(config.sentences).read_text().splitlines() if line.strip()]
    module = build_module(folder, hf, config.target_lang, config.source_lang)
    report = check_parity(folder, Translator(module, batch_size=16), sentences, config.tolerance)
    ckpt = {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "global_step": 0,
            "epoch": 0, "pytorch-lightning_version": L.__version__}
    module.on_save_checkpoint(ckpt)
    ckpt["seq2seq"]["imported"] = {"from": str(folder.resolve()), "model_type": hf["model_type"], **report}
    AtomicCheckpointIO().save_checkpoint(ckpt, output)
    log.info("imported %s (%s, %d parameters) into %s; parity with transformers on %d sentences: greedy and beam-4 "
             "tokens identical, logits within %.2g", folder, hf["model_type"],
             sum(p.numel() for p in module.model.parameters()), output, report["sentences"],
             report["max_logit_difference"])
    return output
