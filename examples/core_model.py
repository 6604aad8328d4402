"""The core without Lightning or Hydra: build an encoder-decoder from registry components and decode.

    python examples/core_model.py
"""

import torch

from seq2seq.decoding import greedy
from seq2seq.model import EncoderDecoder, ModelSpec
from seq2seq.registry import EMBEDDINGS, HEADS

V, PAD, BOS, EOS = 100, 0, 1, 2
spec = ModelSpec(d_model=64, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=128, share_embeddings=True)
embed = EMBEDDINGS.build({"name": "token"}, d_model=spec.d_model, vocab_size=V, padding_idx=PAD)
head = HEADS.build({"name": "linear"}, d_model=spec.d_model, vocab_size=V)
head.tie(embed.weight)
model = EncoderDecoder(spec, embed, embed, head).eval()

src = torch.tensor([[5, 6, 7, 8], [9, 10, PAD, PAD]])  # (B, S)
src_keep = src != PAD  # (B, S) boolean keep mask: True = a real token
tgt_in = torch.tensor([[BOS, 11, 12], [BOS, 13, PAD]])  # (B, T)
logits = model(src, src_keep, tgt_in, tgt_in != PAD)  # (B, T, V), teacher forcing
print("teacher-forced logits:", tuple(logits.shape))
print("greedy (untrained):   ", greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=6).tolist())
