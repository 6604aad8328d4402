"""Test helpers: small random models and batches for the core's tests, and the conformance kit for plugins.

The kit checks that a domain's components keep the core's contracts, from the same overrides a user would train
with (`experiment=...` plus size overrides), each check a plain function that raises AssertionError::

    from seq2seq import testing

    def test_my_domain(tmp_path):
        overrides = ["experiment=g2p", "model=tiny"]
        testing.check_tokenizers(overrides)
        testing.check_contracts(overrides)
        testing.check_checkpoint(overrides, tmp_path)
        testing.check_must_learn(overrides, n_examples=16)

Shapes: B batch, S source length, T target length, V output vocabulary.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from seq2seq.config import compose
from seq2seq.data import Batch, Collate
from seq2seq.decoding import beam_search, greedy
from seq2seq.embeddings import TokenEmbedding
from seq2seq.heads import LinearHead
from seq2seq.model import EncoderDecoder, ModelSpec
from seq2seq.module import Seq2SeqModule, fit_tokenizers, load_tokenizers
from seq2seq.registry import DATASETS

VOCAB = 23  # vocabulary of the random models; ids 0 pad, 1 bos, 2 eos
PAD, BOS, EOS = 0, 1, 2


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
    train = DATASETS.build(config["data"], "data").read("train").pairs
    assert len(train) >= n_pairs, f"the training split has {len(train)} pairs, the kit needs {n_pairs}"
    torch.manual_seed(0)
    return Seq2SeqModule(config, fit_tokenizers(config, train)).eval(), train[:n_pairs]


def _batch(module: Seq2SeqModule, pairs: list[tuple[Any, Any]]) -> Batch:
    collate = Collate.for_tokenizers(module.src_tok, module.tgt_tok)
    return collate([(module.src_tok.encode(s), module.tgt_tok.encode(t)) for s, t in pairs])


def check_tokenizers(overrides: list[str]) -> None:
    """Specials are distinct ids inside the vocabulary; decode gives a string, which encodes back to the same ids
    when raw items are text; the fitted state survives `torch.save` / `torch.load(weights_only=True)` and encodes
    the same."""
    module, pairs = build(overrides)
    shared = module.src_tok is module.tgt_tok
    buffer = io.BytesIO()
    torch.save({"src": module.src_tok.state_dict(), "tgt": None if shared else module.tgt_tok.state_dict()}, buffer)
    buffer.seek(0)
    reloaded = load_tokenizers(module.config, torch.load(buffer, weights_only=True))
    for side, tok, again, items in (("src", module.src_tok, reloaded[0], [s for s, _ in pairs]),
                                    ("tgt", module.tgt_tok, reloaded[1], [t for _, t in pairs])):
        for item in items:
            ids = tok.encode(item)
            assert torch.equal(again.encode(item), ids), f"{side}: a reloaded tokenizer encodes {item!r} differently"
            if side == "tgt" or ids.dtype == torch.long:  # a numeric source has values, not ids
                assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3, f"{side}: pad, bos and eos must differ"
                assert int(ids.min()) >= 0 and int(ids.max()) < tok.vocab_size, f"{side}: ids outside vocabulary"
                text = tok.decode(ids.tolist())
                assert isinstance(text, str), f"{side}: decode must return a string"
                if isinstance(item, str):  # raw items that are text come back as the same ids
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
              "allowed": module.allowed}
    assert torch.equal(greedy(model, **search), greedy(model, **search, use_cache=False)), "cached greedy differs"
    cached, plain = beam_search(model, **search, beam=3), beam_search(model, **search, beam=3, use_cache=False)
    assert torch.equal(cached.tokens, plain.tokens), "cached beam search differs from uncached"


def _fit(module: Seq2SeqModule, pairs: list[tuple[Any, Any]], steps: int, root: Path) -> L.Trainer:
    examples = [(module.src_tok.encode(s), module.tgt_tok.encode(t)) for s, t in pairs]
    loader = DataLoader(examples, batch_size=len(examples), shuffle=True,  # type: ignore[arg-type]
                        collate_fn=Collate.for_tokenizers(module.src_tok, module.tgt_tok))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root)
    trainer.fit(module.train(), loader)
    module.eval()
    return trainer


def check_checkpoint(overrides: list[str], tmp_path: Path) -> None:
    """A Lightning checkpoint (after one training step) loads with `weights_only=True` into a module with equal
    weights and equal predictions, from the checkpoint alone."""
    module, pairs = build(overrides)
    trainer = _fit(module, pairs, 1, tmp_path)
    path = tmp_path / "kit.ckpt"
    trainer.save_checkpoint(path)
    again = Seq2SeqModule.from_checkpoint(path)
    for (name, p), (_, q) in zip(module.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(p, q), f"{name} differs after the round trip"
    sources = [s for s, _ in pairs]
    assert again.predict(sources) == module.predict(sources), "predictions differ after the round trip"


def check_must_learn(overrides: list[str], tmp_path: Path, n_examples: int = 16, steps: int = 300,
                     min_exact_match: float = 0.9) -> float:
    """A model trained on `n_examples` training pairs (one batch, constant learning rate 3e-3 after 20 warm-up
    steps) reproduces at least `min_exact_match` of their targets; returns the share it reproduces."""
    module, pairs = build([*overrides, "optim.schedule=constant", "optim.lr=3e-3", "optim.warmup_steps=20",
                           "optim.label_smoothing=0.0"], n_examples)
    _fit(module, pairs, steps, tmp_path)
    wanted = [module.tgt_tok.decode(module.tgt_tok.encode(t).tolist()) for _, t in pairs]
    got = module.predict([s for s, _ in pairs])
    share = sum(g == w for g, w in zip(got, wanted, strict=True)) / len(pairs)
    assert share >= min_exact_match, f"reproduced {share:.0%} of {len(pairs)} training targets after {steps} steps"
    return share
