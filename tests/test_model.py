import pytest
import torch
from torch import nn

from seq2seq.errors import ConfigError
from seq2seq.model import ModelSpec
from seq2seq.registry import HEADS
from seq2seq.testing import random_batch
from seq2seq.testing import tiny_model as make_model


def _copy_attention(ref: nn.MultiheadAttention, ours) -> None:
    ref.in_proj_weight.copy_(ours.in_proj.weight)
    ref.in_proj_bias.copy_(ours.in_proj.bias)
    ref.out_proj.weight.copy_(ours.out_proj.weight)
    ref.out_proj.bias.copy_(ours.out_proj.bias)


def _copy_block(ref_layer, ours, attentions) -> None:
    for ref_name, our_attn in attentions:
        _copy_attention(getattr(ref_layer, ref_name), our_attn)
    ref_layer.linear1.load_state_dict(ours.ff.w1.state_dict())
    ref_layer.linear2.load_state_dict(ours.ff.w2.state_dict())
    for i, norm in enumerate(ours.norms, 1):
        getattr(ref_layer, f"norm{i}").load_state_dict(norm.state_dict())


def _reference(model) -> nn.Transformer:
    """torch.nn.Transformer with our weights copied in."""
    s = model.spec
    ref = nn.Transformer(s.d_model, s.n_heads, s.n_encoder_layers, s.n_decoder_layers, s.d_ff, dropout=0.0,
                         batch_first=True, norm_first=s.norm_first).eval()
    with torch.no_grad():
        for ref_layer, layer in zip(ref.encoder.layers, model.encoder, strict=True):
            _copy_block(ref_layer, layer, [("self_attn", layer.self_attn)])
        for ref_layer, layer in zip(ref.decoder.layers, model.decoder, strict=True):
            _copy_block(ref_layer, layer, [("self_attn", layer.self_attn), ("multihead_attn", layer.cross_attn)])
    if s.norm_first:
        ref.encoder.norm.load_state_dict(model.encoder_norm.state_dict())
        ref.decoder.norm.load_state_dict(model.decoder_norm.state_dict())
    else:  # nn.Transformer always ends each stack in a norm; the paper's post-norm stacks do not
        ref.encoder.norm, ref.decoder.norm = nn.Identity(), nn.Identity()
    return ref


@pytest.mark.parametrize("norm_first", [False, True])
def test_model_equals_torch_transformer_with_copied_weights(norm_first):
    model = make_model(norm_first=norm_first)
    ref = _reference(model)
    src, src_keep, tgt, tgt_keep = random_batch()
    T = tgt.shape[1]
    ref_out = ref(
        model.src_pos(model.src_embed(src)), model.tgt_pos(model.tgt_embed(tgt)),
        tgt_mask=~torch.ones(T, T, dtype=torch.bool).tril(),  # True = may not attend
        src_key_padding_mask=~src_keep, tgt_key_padding_mask=~tgt_keep, memory_key_padding_mask=~src_keep,
    )
    expected = model.head(ref_out)
    got = model(src, src_keep, tgt, tgt_keep)
    # Only real target positions are defined (padded query rows are never scored).
    torch.testing.assert_close(got[tgt_keep], expected[tgt_keep], atol=1e-5, rtol=1e-5)


def test_decoder_cannot_see_the_future(model):
    src, src_keep, tgt, _ = random_batch()
    keep = torch.ones_like(tgt, dtype=torch.bool)
    before = model(src, src_keep, tgt, keep)
    changed = tgt.clone()
    changed[:, 4:] = (changed[:, 4:] + 5) % 20 + 3  # rewrite positions 4.. only
    after = model(src, src_keep, changed, keep)
    torch.testing.assert_close(after[:, :4], before[:, :4], atol=1e-6, rtol=0)
    assert (after[:, 4:] - before[:, 4:]).abs().max() > 1e-2, "later positions must see the change"


def test_source_padding_changes_no_output(model):
    src, src_keep, tgt, tgt_keep = random_batch()
    out = model(src, src_keep, tgt, tgt_keep)
    extra = 5  # more padding, holding arbitrary ids, must not matter
    padded = torch.cat([src, torch.randint(3, 20, (src.shape[0], extra))], dim=1)
    padded_keep = torch.cat([src_keep, torch.zeros(src.shape[0], extra, dtype=torch.bool)], dim=1)
    padded = padded.masked_fill(~padded_keep, 7)
    torch.testing.assert_close(model(padded, padded_keep, tgt, tgt_keep)[tgt_keep], out[tgt_keep],
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["sinusoidal", "learned"])
def test_positions_matter_permuting_the_source_changes_the_output(positions):
    model = make_model(positions=positions)
    src, _, tgt, _ = random_batch()
    keep_s, keep_t = torch.ones_like(src, dtype=torch.bool), torch.ones_like(tgt, dtype=torch.bool)
    out = model(src, keep_s, tgt, keep_t)
    permuted = model(src.flip(1), keep_s, tgt, keep_t)
    # Without positions, self-attention is permutation-equivariant and the outputs would agree to float noise.
    assert (permuted - out).abs().max() > 0.05


def test_build_model_ties_the_output_projection_to_the_target_embedding_as_configured():
    from seq2seq import compose
    from seq2seq.build import build_model, fit_tokenizers, load_tokenizers

    pairs = [("1 2 3", "3 2 1"), ("4 5", "5 4")]
    for tie in (True, False):
        config = compose(["experiment=reverse", "model=tiny", f"model.tie_output={str(tie).lower()}"])
        built = build_model(config, *load_tokenizers(config, fit_tokenizers(config, pairs)))
        assert (built.head.weight is built.tgt_embed.weight) is tie
    HEADS.register("plain_test_head")(PlainHead)
    config = compose(["experiment=reverse", "model=tiny", "head.name=plain_test_head"])
    with pytest.raises(ConfigError, match=r"`model\.tie_output=true` needs a target `TokenEmbedding` and a `TiedHead`"):
        build_model(config, *load_tokenizers(config, fit_tokenizers(config, pairs)))


class PlainHead(torch.nn.Module):
    """A head that cannot share the embedding's weight (no `TiedHead`)."""

    def __init__(self, d_model: int, vocab_size: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d_model, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(h)


def test_over_long_sequence_is_a_clear_error(model):
    ids = torch.full((1, model.spec.max_positions + 1), 5)
    with pytest.raises(ConfigError, match="max_positions"):
        model.encode(ids, torch.ones_like(ids, dtype=torch.bool))


@pytest.mark.parametrize(("field", "value", "message"), [
    ("n_heads", 3, "divisible"), ("activation", "tanh", "relu, gelu"), ("positions", "rotary", "sinusoidal"),
])
def test_model_spec_rejects_bad_settings_naming_them(field, value, message):
    with pytest.raises(ConfigError, match=message):
        ModelSpec(d_model=32, **{field: value})


def test_cross_attention_maps_cover_the_real_source_positions_only(model):
    src, src_keep, tgt, _ = random_batch()
    w = model.cross_attention(src, src_keep, tgt)  # (B, H, T, S)
    assert w.shape == (4, model.spec.n_heads, tgt.shape[1], src.shape[1])
    assert (w.masked_fill(src_keep[:, None, None, :], 0) == 0).all()


@pytest.mark.parametrize("kind", ["dropout", "attention_dropout", "activation_dropout"])
def test_each_dropout_acts_in_training_only(kind):
    model = make_model(**{kind: 0.3})
    src, src_keep, tgt, tgt_keep = random_batch()
    model.train()
    assert (model(src, src_keep, tgt, tgt_keep) - model(src, src_keep, tgt, tgt_keep)).abs().mean() > 1e-3
    model.eval()
    assert torch.equal(model(src, src_keep, tgt, tgt_keep), model(src, src_keep, tgt, tgt_keep))
