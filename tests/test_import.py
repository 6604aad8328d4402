"""`seq2seq import`: tiny random Hugging Face models (every bias non-zero) imported, checked against transformers,
decoded, refused where the core cannot represent them. The conventions each have a test against their formula."""

import json
import math

import pytest
import torch

pytest.importorskip("transformers")

import hf_models
from conftest import cli

from seq2seq.embeddings import sinusoid_table
from seq2seq.errors import ConfigError
from seq2seq.importing import SENTENCES, build_module, check_parity, map_weights, read_config
from seq2seq.translate import Translator


@pytest.fixture(scope="module")
def marian(tmp_path_factory):
    return hf_models.marian(tmp_path_factory.mktemp("marian") / "opus-mt-tiny")


@pytest.fixture(scope="module")
def nllb(tmp_path_factory):
    return hf_models.nllb(tmp_path_factory.mktemp("nllb") / "nllb-tiny")


NLLB_LANGS = ("source_lang=kor_Hang", "target_lang=eng_Latn")


def _parity(report, fmt):
    """An export of an imported model decodes as the checkpoint: greedy token for token, log-probabilities within
    1e-3; beam-4 token for token through ONNX (the core's search). CTranslate2's beam search stops by its own rule
    under the length normalization these models decode with (docs/deployment.md), so its beam is not compared."""
    assert report["greedy_agreement"] == 1.0 and report["max_logprob_diff"] < 1e-3, (fmt, report)
    if fmt == "onnx":
        assert report["beam4_agreement"] == 1.0, report


def test_the_paper_sinusoids_interleave_sines_and_cosines():
    pe = sinusoid_table(8, torch.arange(50))
    for pos in (0, 7, 49):
        for i in range(4):
            assert pe[pos, 2 * i] == pytest.approx(math.sin(pos / 10000 ** (2 * i / 8)), abs=1e-6)
            assert pe[pos, 2 * i + 1] == pytest.approx(math.cos(pos / 10000 ** (2 * i / 8)), abs=1e-6)


def test_the_silu_feed_forward_is_marians_swish():
    from seq2seq.model import FeedForward, ModelSpec

    ff = FeedForward(ModelSpec(d_model=8, n_heads=2, d_ff=16, activation="silu"))
    x = torch.randn(3, 8)
    h = x @ ff.w1.weight.T + ff.w1.bias
    torch.testing.assert_close(ff(x), (h * torch.sigmoid(h)) @ ff.w2.weight.T + ff.w2.bias)  # swish(h) = h σ(h)


def test_marian_and_fairseq_sinusoids_are_transformers_tables():
    from transformers.models.m2m_100.modeling_m2m_100 import M2M100SinusoidalPositionalEmbedding
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding

    marian = MarianSinusoidalPositionalEmbedding(64, 16).create_weight()
    torch.testing.assert_close(sinusoid_table(16, torch.arange(64), "halves"), marian)
    # fairseq's table, with the row of padding_idx (1) zeroed: real tokens take positions 2, 3, ...
    fairseq = M2M100SinusoidalPositionalEmbedding.get_embedding(64, 16, padding_idx=1)
    torch.testing.assert_close(sinusoid_table(16, torch.arange(2, 64), "fairseq"), fairseq[2:], atol=1e-5, rtol=0)


def test_an_imported_marian_model_decodes_as_transformers_does(marian, tmp_path):
    out = cli("import", f"hf={marian}", f"output={tmp_path / 'opus.ckpt'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "greedy and beam-4 tokens identical" in out.stderr
    ckpt = torch.load(tmp_path / "opus.ckpt", weights_only=True)
    imported = ckpt["seq2seq"]["imported"]
    assert imported["model_type"] == "marian" and imported["max_logit_difference"] <= 1e-4
    assert ckpt["hyper_parameters"]["config"]["model"]["activation"] == "silu"
    # The checkpoint alone translates (its tokenizers inside), as transformers does.
    from transformers import MarianMTModel, MarianTokenizer

    theirs, hf_tok = MarianMTModel.from_pretrained(marian), MarianTokenizer.from_pretrained(marian)
    sentences = hf_models.SENTENCES[:10]
    inputs = hf_tok(sentences, return_tensors="pt", padding=True)
    generated = theirs.generate(**inputs, num_beams=4, max_new_tokens=30, suppress_tokens=[hf_tok.pad_token_id],
                                forced_eos_token_id=None)  # (it would end every output cut at 30 with EOS)
    want = hf_tok.batch_decode(generated, skip_special_tokens=True)
    ours = Translator.from_checkpoint(tmp_path / "opus.ckpt").with_decoding(max_len_a=0.0, max_len_b=30)
    assert ours.translate(sentences) == want
    assert len(set(want)) > 3  # the tiny model's outputs differ by input: the comparison is not of constants


def test_a_multi_target_marian_model_takes_its_language_token_from_target_lang_or_the_line(marian):
    from transformers import MarianTokenizer

    hf_tok = MarianTokenizer.from_pretrained(marian)
    module = build_module(marian, read_config(marian), "fra", None)
    ours = module.src_tok
    for text in ("새 문서를 만듭니다.", "Open the file."):
        want = hf_tok(f">>fra<< {text}")["input_ids"]
        assert want[0] == hf_tok.convert_tokens_to_ids(">>fra<<")
        assert ours.encode(text).tolist() == want  # from target_lang
        assert ours.encode(f">>deu<< {text}").tolist() == hf_tok(f">>deu<< {text}")["input_ids"]  # from the line
    with pytest.raises(ConfigError, match=r"no >>ita<< token; it has \['>>deu<<', '>>fra<<'\]"):
        build_module(marian, read_config(marian), "ita", None)


def test_parity_catches_a_single_wrong_bias(marian):
    hf = read_config(marian)
    module = build_module(marian, hf, None, None)
    report = check_parity(marian, Translator(module, 8), hf_models.SENTENCES[:20], 1e-4)  # three batches
    assert report["sentences"] == 20
    with torch.no_grad():
        module.model.decoder[1].cross_attn.in_proj.bias[72] += 1e-2  # one value bias (q, k, v stacked; D = 32)
    with pytest.raises(ConfigError, match="differ"):
        check_parity(marian, Translator(module, 8), SENTENCES, 1e-4)


def test_what_the_core_cannot_represent_is_refused_by_name(marian, tmp_path):
    hf = read_config(marian)
    weights = {"shared.weight": torch.zeros(3, 2), "encoder.layernorm_embedding.weight": torch.zeros(2)}
    with pytest.raises(ConfigError, match=r"no place for: encoder\.layernorm_embedding\.weight"):
        map_weights(weights, {"n_encoder_layers": 0, "n_decoder_layers": 0, "norm_first": False})
    weights = marian / "model.safetensors"
    before = weights.read_bytes()
    out = cli("import", f"hf={marian}", f"output={weights}", "force=true", cwd=tmp_path)  # an input, even forced
    assert out.returncode == 2 and "is the input" in out.stderr and weights.read_bytes() == before
    for change, message in (({"model_type": "t5"}, "model_type 't5' cannot be imported"),
                            ({"activation_function": "gelu_new"}, "activation_function 'gelu_new'"),
                            ({"scale_embedding": False}, "scale_embedding=false")):
        folder = tmp_path / change.get("model_type", next(iter(change)))
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({**hf, **change}))
        out = cli("import", f"hf={folder}", f"output={tmp_path / 'x.ckpt'}", cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert not (tmp_path / "x.ckpt").exists()


@pytest.mark.slow  # import, two exports, parity
def test_an_imported_model_exports_to_ctranslate2_and_onnx_with_parity(marian, tmp_path):
    pytest.importorskip("ctranslate2")
    from seq2seq.exporting import export

    out = cli("import", f"hf={marian}", f"output={tmp_path / 'opus.ckpt'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for fmt in ("ctranslate2", "onnx"):
        report = export(tmp_path / "opus.ckpt", fmt, tmp_path / fmt, check_limit=20)["parity"]
        _parity(report, fmt)


@pytest.mark.slow  # import, two fine-tunings, export
def test_an_imported_model_fine_tuned_and_adapted_exports_to_ctranslate2_with_parity(marian, tmp_path):
    pytest.importorskip("ctranslate2")
    from conftest import text_corpus

    from seq2seq import compose, train
    from seq2seq.exporting import export

    assert cli("import", f"hf={marian}", f"output={tmp_path / 'opus.ckpt'}", cwd=tmp_path).returncode == 0
    corpus = text_corpus(tmp_path / "data")
    run = ["experiment=translate_ko_en", f"data.path={corpus}", f"init={tmp_path / 'opus.ckpt'}", "optim.lr=0.5",
           "trainer.max_steps=6", "trainer.max_time=null", "trainer.enable_progress_bar=false",
           "optim.ema_decay=null", "loader.max_tokens=512"]
    for name, extra in (("full", []), ("lora", ["model.lora.rank=4"])):
        tuned = train(compose([*run, *extra]), tmp_path / name)
        start = torch.load(tmp_path / "opus.ckpt", weights_only=True)["state_dict"]["model.encoder.0.ff.w1.weight"]
        assert not torch.allclose(tuned.model.encoder[0].ff.w1.weight, start, atol=1e-4)  # (adapted: W + BA)
        last = tmp_path / name / "checkpoints" / "last.ckpt"
        report = export(last, "ctranslate2", tmp_path / f"{name}-ct2", check_limit=20)["parity"]
        _parity(report, "ctranslate2")


@pytest.mark.slow
def test_a_real_opus_mt_model(tmp_path):
    """Opt-in: `SEQ2SEQ_OPUS_MT=path/to/opus-mt-xx-yy` (a folder `huggingface-cli download` wrote)."""
    import os

    folder = os.environ.get("SEQ2SEQ_OPUS_MT")
    if not folder:
        pytest.skip("no real OPUS-MT model: set SEQ2SEQ_OPUS_MT to the folder of one to import it")
    out = cli("import", f"hf={folder}", f"output={tmp_path / 'real.ckpt'}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "greedy and beam-4 tokens identical" in out.stderr


@pytest.mark.slow  # import and decoding against transformers
def test_an_imported_nllb_model_decodes_as_transformers_does_with_its_forced_language(nllb, tmp_path):
    out = cli("import", f"hf={nllb}", f"output={tmp_path / 'nllb.ckpt'}", *NLLB_LANGS, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    config = torch.load(tmp_path / "nllb.ckpt", weights_only=True)["hyper_parameters"]["config"]
    assert (config["model"]["norm_first"], config["model"]["sinusoid"], config["model"]["position_offset"]) == (
        True, "fairseq", 2)
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    theirs = AutoModelForSeq2SeqLM.from_pretrained(nllb)
    hf_tok = AutoTokenizer.from_pretrained(nllb, src_lang="kor_Hang", tgt_lang="eng_Latn")
    sentences = hf_models.SENTENCES[:10]
    generated = theirs.generate(**hf_tok(sentences, return_tensors="pt", padding=True), num_beams=4,
                                max_new_tokens=30, forced_bos_token_id=hf_tok.convert_tokens_to_ids("eng_Latn"),
                                suppress_tokens=[hf_tok.pad_token_id])
    ours = Translator.from_checkpoint(tmp_path / "nllb.ckpt").with_decoding(max_len_a=0.0, max_len_b=30)
    tokens = ours.tokens(sentences)
    assert all(t[0] == hf_tok.convert_tokens_to_ids("eng_Latn") for t in tokens)  # the forced target language
    assert ours.translate(sentences) == hf_tok.batch_decode(generated, skip_special_tokens=True)
    assert len({tuple(t) for t in tokens}) > 3

    out = cli("import", f"hf={nllb}", f"output={tmp_path / 'x.ckpt'}", "source_lang=kor_Hang",
               "target_lang=deu_Latn", cwd=tmp_path)
    assert out.returncode == 2 and "no 'deu_Latn' token" in out.stderr and "eng_Latn" in out.stderr


@pytest.mark.slow  # import, fine-tuning, two exports
def test_an_imported_nllb_model_fine_tuned_exports_to_ctranslate2_and_onnx_with_parity(nllb, tmp_path):
    pytest.importorskip("ctranslate2")
    from conftest import text_corpus

    from seq2seq import compose, train
    from seq2seq.exporting import export

    assert cli("import", f"hf={nllb}", f"output={tmp_path / 'nllb.ckpt'}", *NLLB_LANGS, cwd=tmp_path).returncode == 0
    corpus = text_corpus(tmp_path / "data")
    run = ["experiment=translate_ko_en", f"data.path={corpus}", f"init={tmp_path / 'nllb.ckpt'}", "optim.lr=0.5",
           "trainer.max_steps=6", "trainer.max_time=null", "trainer.enable_progress_bar=false",
           "optim.ema_decay=null", "loader.max_tokens=512"]
    train(compose(run), tmp_path / "run")
    for fmt in ("ctranslate2", "onnx"):
        report = export(tmp_path / "run" / "checkpoints" / "last.ckpt", fmt, tmp_path / fmt, check_limit=20)["parity"]
        _parity(report, fmt)
