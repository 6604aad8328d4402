"""Test helpers: small random models and batches for the core's tests, and the conformance kit for plugins.

The kit checks that a domain's components keep the core's contracts, from the same overrides a user would train
with (`experiment=...` plus size overrides), each check a plain function that raises AssertionError::

    from seq2seq import testing

    def test_my_domain(tmp_path):
        overrides = ["experiment=g2p", "model=tiny"]
        testing.check_tokenizers(overrides)
        testing.check_rows(overrides, tmp_path)
        testing.check_contracts(overrides)
        testing.check_checkpoint(overrides, tmp_path)
        testing.check_export(overrides, tmp_path)
        testing.check_must_learn(overrides, tmp_path, n_examples=16)

Shapes: B batch, S source length, T target length, V output vocabulary.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from seq2seq.beam import beam_search
from seq2seq.build import fit_encoders, fit_tokenizers
from seq2seq.config import compose
from seq2seq.data import Batch, Collate
from seq2seq.decoding import greedy
from seq2seq.domain import Encoder, Tokenizer
from seq2seq.embeddings import TokenEmbedding
from seq2seq.heads import LinearHead
from seq2seq.model import EncoderDecoder, ModelSpec
from seq2seq.module import Seq2SeqModule
from seq2seq.registry import DATASETS, TOKENIZERS
from seq2seq.schemas import TrainConfig
from seq2seq.translate import Translator

VOCAB = 23  # vocabulary of the random models; ids 0 pad, 1 bos, 2 eos
PAD, BOS, EOS = 0, 1, 2


class Favour(torch.nn.Module):
    """A head that adds `bonus` to chosen logits: a model that would rather emit them."""

    def __init__(self, head: torch.nn.Module, ids: list[int], bonus: float = 100.0) -> None:
        super().__init__()
        self.head, self.ids, self.bonus = head, ids, bonus

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.head(h).clone()
        logits[..., self.ids] += self.bonus
        return logits


def tiny_model(seed: int = 0, **spec: object) -> EncoderDecoder:
    """A small randomly initialised token-to-token model in eval mode (dropout off), output tied to input."""
    torch.manual_seed(seed)
    sizes = {"d_model": 32, "n_heads": 4, "n_encoder_layers": 2, "n_decoder_layers": 2, "d_ff": 64,
             "dropout": 0.0, "max_positions": 64}
    model_spec = ModelSpec(**{**sizes, **spec})  # type: ignore[arg-type]
    head = LinearHead(model_spec.d_model, VOCAB)
    tgt = TokenEmbedding(VOCAB, model_spec.d_model, padding_idx=PAD)
    head.tie(tgt.weight)
    return EncoderDecoder(model_spec, TokenEmbedding(VOCAB, model_spec.d_model, padding_idx=PAD), tgt, head).eval()


def random_batch(seed: int = 1, S: int = 9, T: int = 7) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four examples of different lengths: src (B, S), src_keep (B, S), tgt (B, T), tgt_keep (B, T)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, VOCAB, (4, S), generator=g)
    tgt = torch.randint(3, VOCAB, (4, T), generator=g)
    src_keep = torch.arange(S)[None] < torch.tensor([S, S - 3, 2, S - 1])[:, None]
    tgt_keep = torch.arange(T)[None] < torch.tensor([T, 2, T - 1, 4])[:, None]
    return src.masked_fill(~src_keep, PAD), src_keep, tgt.masked_fill(~tgt_keep, PAD), tgt_keep


# ---- the conformance kit ----------------------------------------------------------------------------------------


def build(overrides: list[str], n_pairs: int = 8) -> tuple[Seq2SeqModule, list[tuple[Any, Any]]]:
    """The module a run with `overrides` would train (tokenizers fitted on its training split, eval mode, dropout
    off) and the first `n_pairs` raw training pairs."""
    config = compose([*overrides, "model.dropout=0.0"])
    train = DATASETS.build(config.data, "data").read("train").pairs
    assert len(train) >= n_pairs, f"the training split has {len(train)} pairs, the kit needs {n_pairs}"
    torch.manual_seed(0)
    return Seq2SeqModule(config, fit_tokenizers(config, train)).eval(), train[:n_pairs]


def _batch(module: Seq2SeqModule, pairs: list[tuple[Any, Any]]) -> Batch:
    collate = Collate.for_tokenizers(module.src_tok, module.tgt_tok)
    return collate([(module.src_tok.encode(s), module.tgt_tok.encode(t)) for s, t in pairs])


def _fitted(overrides: list[str], n_pairs: int) -> tuple[list[tuple[str, Encoder, list[Any]]], TrainConfig]:
    """Freshly fitted encoders (not reloaded from their state) with the raw items of their side."""
    config = compose(overrides)
    train = DATASETS.build(config.data, "data").read("train").pairs
    sample = random.Random(0).sample(train, min(n_pairs, len(train)))
    src, tgt = fit_encoders(config, train)
    if tgt is None:
        return [("src", src, [s for s, _ in sample] + [t for _, t in sample])], config
    return [("src", src, [s for s, _ in sample]), ("tgt", tgt, [t for _, t in sample])], config


def check_tokenizers(overrides: list[str], n_pairs: int = 64) -> None:
    """On training items drawn at random: specials are distinct ids inside the vocabulary; a text item comes back
    from decode(encode(text)) as itself (after the tokenizer's `normalize`); decode then encode gives the same ids;
    and the state saved by `state_dict()`, through `torch.save` / `torch.load(weights_only=True)`, rebuilds a
    tokenizer that encodes exactly as the fitted one."""
    sides, config = _fitted(overrides, n_pairs)
    specs = {"src": config.tokenizer.src, "tgt": config.tokenizer.tgt}
    for side, tok, items in sides:
        buffer = io.BytesIO()
        torch.save(tok.state_dict(), buffer)
        buffer.seek(0)
        again = TOKENIZERS.build(specs[side], f"tokenizer.{side}")
        again.load_state_dict(torch.load(buffer, weights_only=True))
        for item in items:
            ids = tok.encode(item)
            try:
                reloaded = again.encode(item)
            except Exception as err:
                raise AssertionError(f"{side}: a tokenizer rebuilt from its `state_dict()` cannot encode {item!r} "
                                     f"({type(err).__name__}: {err}); does `state_dict()` hold the fitted state?"
                                     ) from err
            assert torch.equal(reloaded, ids), (f"{side}: a tokenizer rebuilt from its `state_dict()` encodes "
                                                f"{item!r} differently; does `state_dict()` hold the fitted state?")
            if not isinstance(tok, Tokenizer):
                continue  # feature values: nothing to decode
            assert tok.pad_id != tok.eos_id, f"{side}: pad and eos must differ"
            assert all(0 <= i < tok.vocab_size for i in (tok.pad_id, tok.bos_id, tok.eos_id, *tok.forced_prefix)), (
                f"{side}: special ids outside the vocabulary")
            assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size, f"{side}: ids outside the vocabulary"
            text = tok.decode(ids.tolist())
            assert isinstance(text, str), f"{side}: decode must return a string"
            if isinstance(item, str):
                assert not tok.lossless or text == tok.normalize(item), (
                    f"{side}: decode(encode({item!r})) gives {text!r}; a tokenizer that cannot give text back "
                    "must declare `lossless = False`")
                assert torch.equal(tok.encode(text), ids), f"{side}: decode then encode changes {item!r}"


def check_contracts(overrides: list[str], atol: float = 1e-5) -> None:
    """Batch and logit shapes; each example's logits do not depend on the padding its batch adds; cached greedy
    and beam search equal their uncached versions."""
    module, pairs = build(overrides)
    model, tok = module.model, module.tgt_tok
    batch = _batch(module, pairs)
    B, S = batch.src_keep.shape
    T = batch.tgt_in.shape[1]
    assert batch.src.shape[:2] == (B, S) and batch.tgt_out.shape == (B, T), "Batch shapes disagree"
    with torch.no_grad():
        logits = model(batch.src, batch.src_keep, batch.tgt_in, batch.tgt_keep)
        assert logits.shape == (B, T, tok.vocab_size), f"logits {tuple(logits.shape)}, expected {(B, T, 'V')}"
        assert torch.isfinite(logits[batch.tgt_keep]).all(), "non-finite logits at real positions"
        for i in range(B):
            one = _batch(module, pairs[i : i + 1])
            alone = model(one.src, one.src_keep, one.tgt_in, one.tgt_keep)[0]  # (T_i, V)
            padded = logits[i, : alone.shape[0]]
            assert torch.allclose(alone, padded, atol=atol), f"example {i}: logits change with the batch's padding"
    search = {"src": batch.src, "src_keep": batch.src_keep, "bos": tok.bos_id, "eos": tok.eos_id, "max_len": T + 4,
              "allowed": module.decoder.allowed(batch.src.device)}
    assert torch.equal(greedy(model, **search), greedy(model, **search, use_cache=False)), "cached greedy differs"
    cached, plain = beam_search(model, **search, beam=3), beam_search(model, **search, beam=3, use_cache=False)
    assert torch.equal(cached.tokens, plain.tokens), "cached beam search differs from uncached"


def fit(module: Seq2SeqModule, pairs: list[tuple[Any, Any]], steps: int, root: Path) -> L.Trainer:
    """Train `module` for `steps` full-batch steps on `pairs` with a plain Lightning Trainer (no checkpoints, no
    logs); the trainer is returned, so its `save_checkpoint` writes what `Seq2SeqModule.from_checkpoint` loads."""
    examples = [(module.src_tok.encode(s), module.tgt_tok.encode(t)) for s, t in pairs]
    loader = DataLoader(examples, batch_size=len(examples), shuffle=True,  # type: ignore[arg-type]
                        collate_fn=Collate.for_tokenizers(module.src_tok, module.tgt_tok))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module.train(), loader)
    module.eval()
    return trainer


FRESH_PROCESS = """
import json, pickle, sys, torch
from seq2seq import Seq2SeqModule, Translator
module = Seq2SeqModule.from_checkpoint(sys.argv[1])  # before anything imports a plugin
sources = pickle.load(open(sys.argv[2], "rb"))
torch.save(module.state_dict(), sys.argv[3])
json.dump(Translator(module).translate(sources), open(sys.argv[4], "w"))
"""


def check_rows(overrides: list[str], tmp_path: Path) -> None:
    """The reader accounts for every row (the file rows each split reads are those its `write_sample` wrote, each
    example kept or rejected by a named reason), and reading again puts every example in the same split."""
    config = compose(overrides)
    reader = DATASETS.build(config.data, "data")
    sample = reader.write_sample(tmp_path)
    expected = None
    if sample is not None:
        options, expected = sample
        reader = DATASETS.build({**config.data, **options}, "data")
    reads = []
    for _ in range(2):
        read = {split: list(reader.stream((split,))) for split in reader.splits}
        reads.append({split: pickle.dumps([rows.pairs for rows in runs]) for split, runs in read.items()})
        for split, runs in read.items():
            lines = sum(rows.lines_read for rows in runs)
            if expected is not None and lines != expected[split]:
                raise AssertionError(f"the {split} split read {lines} rows of the sample, which holds "
                                     f"{expected[split]}: rows were dropped without being counted as rejected")
            reasons = [reason for rows in runs for reason in rows.rejected]
            if not all(isinstance(r, str) and r.strip() for r in reasons):
                raise AssertionError(f"the {split} split rejects rows without naming the reason: {reasons}")
    if reads[0] != reads[1]:
        changed = [split for split in reads[0] if reads[0][split] != reads[1][split]]
        raise AssertionError(f"reading twice gave other examples in the {', '.join(changed)} split(s): split "
                             "assignment must be stable")


def check_checkpoint(overrides: list[str], tmp_path: Path) -> None:
    """A Lightning checkpoint (after one training step) loads with `weights_only=True`, in a fresh Python process
    that has imported nothing else, into a module with equal weights and equal predictions."""
    module, pairs = build(overrides)
    trainer = fit(module, pairs, 1, tmp_path)
    path = tmp_path / "kit.ckpt"
    trainer.save_checkpoint(path)
    sources = [s for s, _ in pairs]
    with open(tmp_path / "sources.pkl", "wb") as f:
        pickle.dump(sources, f)
    out = [tmp_path / "state.pt", tmp_path / "predictions.json"]
    args = [str(path), str(tmp_path / "sources.pkl"), *map(str, out)]
    run = subprocess.run([sys.executable, "-c", FRESH_PROCESS, *args], capture_output=True, text=True)
    assert run.returncode == 0, f"the checkpoint does not load in a fresh process:\n{run.stderr[-2000:]}"
    state = torch.load(out[0], weights_only=True)
    for name, p in module.state_dict().items():
        assert torch.equal(p, state[name]), f"{name} differs after the round trip"
    expected = Translator(module).translate(sources)
    assert json.loads(out[1].read_text()) == expected, "predictions differ after the round trip"


def check_export(overrides: list[str], tmp_path: Path, n_pairs: int = 8) -> None:
    """After five training steps, the model exports to ONNX, and to CTranslate2 when its source is token ids, and
    each export decodes the training pairs' sources as the eager model does (greedy and beam-4, token for token;
    reference log-probabilities or label probabilities within the export's tolerances). A CTranslate2 refusal of a
    feature-value source is expected, and checked to be a ConfigError."""
    from seq2seq.errors import ConfigError
    from seq2seq.exporting import export

    module, pairs = build(overrides, n_pairs)
    fit(module, pairs, 5, tmp_path).save_checkpoint(tmp_path / "kit.ckpt")
    formats = ["onnx"] + (["ctranslate2"] if isinstance(module.src_tok, Tokenizer) else [])
    for fmt in formats:
        report = export(tmp_path / "kit.ckpt", fmt, tmp_path / fmt, check="train", check_limit=n_pairs)["parity"]
        assert report["greedy_agreement"] == 1.0, f"{fmt}: greedy outputs differ from the eager model's: {report}"
    if "ctranslate2" not in formats:
        try:
            export(tmp_path / "kit.ckpt", "ctranslate2", tmp_path / "ctranslate2", check=None)
        except ConfigError:
            return
        raise AssertionError("CTranslate2 export of a feature-value source was not refused")


def check_must_learn(overrides: list[str], tmp_path: Path, n_examples: int = 16, steps: int = 600,
                     min_exact_match: float = 0.9) -> float:
    """A model trained on `n_examples` training pairs (one batch, constant learning rate 3e-3 after 20 warm-up
    steps) reproduces at least `min_exact_match` of their targets; returns the share it reproduces."""
    module, pairs = build([*overrides, "optim.schedule=constant", "optim.lr=3e-3", "optim.warmup_steps=20",
                           "optim.label_smoothing=0.0"], n_examples)
    fit(module, pairs, steps, tmp_path)
    wanted = [module.tgt_tok.decode(module.tgt_tok.encode(t).tolist()) for _, t in pairs]
    got = Translator(module).translate([s for s, _ in pairs])
    share = sum(g == w for g, w in zip(got, wanted, strict=True)) / len(pairs)
    misses = [(g, w) for g, w in zip(got, wanted, strict=True) if g != w][:3]
    assert share >= min_exact_match, (
        f"reproduced {share:.0%} of {len(pairs)} training targets after {steps} steps (output, wanted: {misses}). "
        "If `check_tokenizers` fails too, fix that first: the model trains with encoders rebuilt from their "
        "`state_dict()`")
    return share
