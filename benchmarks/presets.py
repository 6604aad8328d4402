"""Model sizes shared by the benchmarks (`small` and the paper's `base`) and our model built at those sizes."""

from __future__ import annotations

import argparse

from seq2seq.embeddings import TokenEmbedding
from seq2seq.heads import LinearHead
from seq2seq.model import EncoderDecoder, ModelSpec

PRESETS = {
    "small": {"d_model": 256, "n_heads": 4, "layers": 3, "d_ff": 1024, "vocab": 8000},
    "base": {"d_model": 512, "n_heads": 8, "layers": 6, "d_ff": 2048, "vocab": 32000},
}
PAD, BOS, EOS = 0, 1, 2


def ours(p: dict, dropout: float) -> EncoderDecoder:
    """Shared, tied token embeddings, sinusoidal positions, post-norm: the `small`/`base` model of our presets.

    `dropout` applies where torch.nn.Transformer applies it (residual, attention weights, inside the feed-forward),
    so that the peers do the same work.
    """
    spec = ModelSpec(d_model=p["d_model"], n_heads=p["n_heads"], n_encoder_layers=p["layers"],
                     n_decoder_layers=p["layers"], d_ff=p["d_ff"], dropout=dropout, attention_dropout=dropout,
                     activation_dropout=dropout, share_embeddings=True)
    embed = TokenEmbedding(p["vocab"], p["d_model"], padding_idx=PAD)
    head = LinearHead(p["d_model"], p["vocab"])
    head.tie(embed.weight)
    return EncoderDecoder(spec, embed, embed, head)


def marian(p: dict, dropout: float = 0.0):
    """Hugging Face `MarianMTModel` of the same sizes, random weights (nothing downloaded); dropout where ours has
    it. Needs `pip install transformers`."""
    from transformers import MarianConfig, MarianMTModel

    config = MarianConfig(
        vocab_size=p["vocab"], d_model=p["d_model"], encoder_layers=p["layers"], decoder_layers=p["layers"],
        encoder_attention_heads=p["n_heads"], decoder_attention_heads=p["n_heads"], encoder_ffn_dim=p["d_ff"],
        decoder_ffn_dim=p["d_ff"], max_position_embeddings=1024, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=BOS, forced_eos_token_id=None, scale_embedding=True, activation_function="relu",
        dropout=dropout, attention_dropout=dropout, activation_dropout=dropout)
    return MarianMTModel(config)


def decode_arguments(doc: str) -> argparse.Namespace:
    """The command line of the decoding benchmarks: preset, batch, source length, new tokens, repetitions."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="small")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--new", type=int, default=32, help="tokens generated per row")
    parser.add_argument("--reps", type=int, default=5)
    return parser.parse_args()
