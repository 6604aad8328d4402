"""Tiny random Hugging Face translation models on disk, as `save_pretrained` writes them, for the import tests:
every weight and bias (the output bias included) random and non-zero, tokenizers trained on a few sentences."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

SENTENCES = [
    "새 문서를 만듭니다.", "파일을 열고 저장합니다.", "The quick brown fox jumps over the lazy dog.",
    "Open a new document and save it.", "표를 삽입하려면 메뉴를 선택하십시오.", "Select the cells you want to format.",
    "차트의 제목을 바꿉니다.", "Press Enter to confirm the entry.", "글꼴 크기를 지정합니다.",
    "Numbers, dates and 42 %.",
] * 20


def _spm(sentences: list[str], vocab_size: int, **options) -> bytes:
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
                                   character_coverage=1.0, minloglevel=2, hard_vocab_limit=False, **options)
    return model.getvalue()


def _randomize(model: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Every floating tensor random (biases and norms included), so that no mapping error hides behind a zero or a
    one. The callers then raise EOS's logits, so that outputs end at different steps, and lower <pad>'s, as in a
    trained model, which never predicts it (searches never emit it; transformers' beam scores leave its probability
    in, seq2seq's and CTranslate2's take it out)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if tensor.is_floating_point() and "positions" not in name:
                noise = torch.randn(tensor.shape, generator=g) * scale
                tensor.copy_(noise + 1 if "norm.weight" in name else noise)


def marian(folder: Path, seed: int = 0, d_model: int = 32, **config) -> Path:
    """A MarianMTModel with its MarianTokenizer files (source.spm, target.spm, vocab.json)."""
    import sentencepiece as spm
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    src, tgt = _spm(SENTENCES, 120), _spm(SENTENCES[::-1], 110)
    (folder / "source.spm").write_bytes(src)
    (folder / "target.spm").write_bytes(tgt)
    pieces = ["</s>", "<unk>", ">>fra<<", ">>deu<<"]  # language tokens, as a multi-target model has
    for model in (src, tgt):
        proc = spm.SentencePieceProcessor(model_proto=model)
        pieces += [p for p in (proc.id_to_piece(i) for i in range(proc.get_piece_size())) if p not in pieces
                   and p not in ("<s>", "<unk>", "</s>")]
    pieces.append("<pad>")
    (folder / "vocab.json").write_text(json.dumps({p: i for i, p in enumerate(pieces)}, ensure_ascii=False))
    settings = dict(vocab_size=len(pieces), d_model=d_model, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=128, pad_token_id=len(pieces) - 1, eos_token_id=0,
                    decoder_start_token_id=len(pieces) - 1, activation_function="swish", scale_embedding=True,
                    dropout=0.0)
    torch.manual_seed(seed)
    model = MarianMTModel(MarianConfig(**{**settings, **config}))
    _randomize(model, seed)
    with torch.no_grad():
        model.final_logits_bias[..., 0] += 2.5  # </s>
        model.final_logits_bias[..., -1] -= 30  # <pad>
    model.save_pretrained(folder)
    MarianTokenizer(*(str(folder / f) for f in ("source.spm", "target.spm", "vocab.json"))).save_pretrained(folder)
    return folder


LANGUAGES = ["kor_Hang", "eng_Latn", "fra_Latn"]


def nllb(folder: Path, seed: int = 0, d_model: int = 32, **config) -> Path:
    """An M2M100ForConditionalGeneration with an NllbTokenizer (tokenizer.json: a BPE trained here, three language
    codes), as NLLB-200 is: pre-norm, fairseq positions from 2, decoding from </s> then the target language."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    bpe.train_from_iterator(SENTENCES, trainers.BpeTrainer(vocab_size=150, special_tokens=["<s>", "<pad>", "</s>",
                                                                                            "<unk>"]))
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = NllbTokenizer(vocab=state["vocab"], merges=merges, extra_special_tokens=LANGUAGES, src_lang="kor_Hang",
                        tgt_lang="eng_Latn")
    tok.save_pretrained(folder)
    settings = dict(vocab_size=len(tok), d_model=d_model, encoder_layers=2, decoder_layers=2,
                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                    max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                    decoder_start_token_id=2, activation_function="relu", scale_embedding=True, dropout=0.0)
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(M2M100Config(**{**settings, **config}))
    _randomize(model, seed, scale=0.15)  # (pre-norm: the residual stream grows with every random layer)
    with torch.no_grad():  # no output bias: a direction u of the final norm's bias lowers <pad>, raises </s>
        u = torch.randn(d_model, generator=torch.Generator().manual_seed(seed + 1))
        u /= u.norm()
        embedding = model.model.shared.weight  # tied to the output layer
        embedding -= (embedding @ u)[:, None] * u
        embedding[2] += 0.08 * u
        embedding[1] -= 3 * u
        model.model.decoder.layer_norm.bias += 10 * u
    model.save_pretrained(folder)
    return folder
