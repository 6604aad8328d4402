import pytest
import sacrebleu
import torch

from seq2seq import Translator, compose
from seq2seq.errors import ConfigError, DataError
from seq2seq_plugins.text import (
    BLEU,
    BPETokenizer,
    CharTokenizer,
    ChrF,
    ChrFPlusPlus,
    ParallelCorpus,
    SentencePieceTokenizer,
    WordTokenizer,
)

CORPUS = [
    ("새 문서를 만듭니다.", "Creates a new document."),
    ("셀의 내용을 위쪽에 맞춥니다.", "Aligns the contents of the cell to the top edge of the cell."),
    ("%s 파일을 열 수 없습니다.", "The file %s cannot be opened."),
    ("표를 삽입합니다.", "Inserts a table."),
] * 20
SAMPLES = ["새 문서를 만듭니다. %s 표", "The file %s cannot be opened.", "셀의 내용을 위쪽에 맞춥니다."]


@pytest.mark.parametrize("make", [lambda: BPETokenizer(vocab_size=300, min_frequency=1),
                                  lambda: SentencePieceTokenizer(vocab_size=120), CharTokenizer])
def test_tokenizers_round_trip_korean_english_and_placeholders(make):
    tok = make()
    tok.fit([s for pair in CORPUS for s in pair])
    restored = make()
    restored.load_state_dict(tok.state_dict())
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids.dtype == torch.long and (ids >= 0).all()
        assert tok.decode(ids.tolist()) == text
        assert torch.equal(restored.encode(text), ids)
    assert tok.decode([tok.bos_id, *tok.encode("표").tolist(), tok.eos_id, tok.pad_id]) == "표"


def test_word_tokenizer_maps_unknown_words_to_unk():
    tok = WordTokenizer()
    tok.fit(["a table", "a cell"])
    assert tok.decode(tok.encode("a chair").tolist()) == "a ⁇"


def _write(path, rows: list[bytes]) -> str:
    path.write_bytes(b"ko\ten\tsplit\n" + b"\n".join(rows) + b"\n")
    return str(path)


def test_reader_keeps_na_text_and_counts_every_rejection(tmp_path):
    rows = [
        "표\tTable\ttrain".encode(),
        b"NA\tnull\ttrain",  # real text, never NaN
        b"\tEmpty source\ttrain",
        "빈 대상\t\ttrain".encode(),
        b"\t\ttrain",  # a blank pair
        "긴 문장\t".encode() + b"x" * 50 + b"\ttrain",  # ratio
        "abc\xff\xfe\tbad bytes\ttrain".encode("latin-1"),
        "셀\t".encode() + b"y" * 200 + b"\ttrain",  # too long
    ]
    reader = ParallelCorpus(path=_write(tmp_path / "c.tsv", rows), max_chars=100, max_ratio=5.0)
    split = reader.read("train")
    assert split.pairs == [("표", "Table"), ("NA", "null")]
    assert dict(split.rejected) == {"empty source": 1, "blank line": 1, "empty target": 1,
                                    "length ratio above 5.0": 1, "undecodable text": 1,
                                    "longer than 100 characters": 1}
    assert split.examples_read == len(split.pairs) + sum(split.rejected.values()) == 8


def test_a_blank_line_in_a_file_with_a_split_column_is_kept_and_counted(tmp_path):
    reader = ParallelCorpus(path=_write(tmp_path / "c.tsv", [b"a\tb\ttrain", b"", b"c\td\tval", b"e\tf\ttest"]))
    train = reader.read("train")
    assert train.pairs == [("a", "b")] and dict(train.rejected) == {"blank line": 1} and train.examples_read == 2
    assert [reader.read(s).examples_read for s in ("val", "test")] == [1, 1]


@pytest.mark.parametrize(("content", "message"), [
    (None, r"no such file; set `data\.path`"),
    (b"", r"the file is empty; it needs a header row"),
    (b"ko\ten\tsplit\na\tb\ttrain\nc\td\te\ttrain\n", r"Expected 3 fields in line 3, saw 4\. A row must have one"),
])
def test_a_file_that_cannot_be_read_is_a_data_error_naming_it(tmp_path, content, message):
    path = tmp_path / "c.tsv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        ParallelCorpus(path=str(path)).read("train")


def test_reader_splits_by_hash_when_there_is_no_split_column(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("src,tgt\n" + "".join(f"문장 {i},sentence {i}\n" for i in range(400)))
    reader = ParallelCorpus(path=str(path), source="src", target="tgt", split_column=None, val_fraction=0.1,
                            test_fraction=0.1)
    sizes = {s: len(reader.read(s).pairs) for s in reader.splits}
    assert sum(sizes.values()) == 400 and 20 < sizes["val"] < 65 and 20 < sizes["test"] < 65
    again = ParallelCorpus(path=str(path), source="src", target="tgt", split_column=None, val_fraction=0.1,
                           test_fraction=0.1)
    assert again.read("val").pairs == reader.read("val").pairs


def test_reader_names_missing_columns_and_bad_split_values(tmp_path):
    with pytest.raises(DataError, match=r"missing column\(s\) \['de'\]"):
        ParallelCorpus(path=_write(tmp_path / "c.tsv", [b"a\tb\ttrain"]), source="de").read("train")
    with pytest.raises(DataError, match=r"lines 3$"):
        ParallelCorpus(path=_write(tmp_path / "c.tsv", [b"a\tb\ttrain", b"c\td\tdev"])).read("train")


def test_bleu_and_chrf_equal_sacrebleu_on_the_same_strings():
    tok = CharTokenizer()
    hyps = ["Creates a new document.", "Aligns the cell to the top.", "The file cannot open."]
    refs = ["Creates a new document.", "Aligns the contents of the cell to the top edge.",
            "The file %s cannot be opened."]
    tok.fit(hyps + refs)
    ids = lambda texts: [tok.encode(t).tolist() for t in texts]  # noqa: E731
    bleu, chrf = BLEU(tok), ChrF(tok)
    bleu.update(ids(hyps[:2]), ids(refs[:2]))  # two batches: corpus statistics accumulate
    bleu.update(ids(hyps[2:]), ids(refs[2:]))
    chrf.update(ids(hyps), ids(refs))
    assert float(bleu.compute()) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-3)
    # torchmetrics smooths zero n-gram counts like the original chrF++.py (sacrebleu's eps_smoothing=True)
    reference_chrf = sacrebleu.metrics.CHRF(eps_smoothing=True).corpus_score(hyps, [refs]).score
    assert float(chrf.compute()) == pytest.approx(reference_chrf, abs=1e-3)
    chrf_pp = ChrFPlusPlus(tok)  # with word unigrams and bigrams
    chrf_pp.update(ids(hyps), ids(refs))
    reference_pp = sacrebleu.metrics.CHRF(word_order=2, eps_smoothing=True).corpus_score(hyps, [refs]).score
    assert float(chrf_pp.compute()) == pytest.approx(reference_pp, abs=1e-3)
    assert abs(reference_pp - reference_chrf) > 0.5  # the word n-grams count
    # eff:no is sacreBLEU's mark of eps smoothing
    assert chrf_pp.signature.startswith("nrefs:1|case:mixed|eff:no|nc:6|nw:2|space:no|version:")
    assert bleu.signature == f"nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:{sacrebleu.__version__}"


def test_splits_can_come_from_separate_files(tmp_path):
    for name, rows in (("train", 5), ("val", 2), ("test", 3)):
        (tmp_path / f"{name}.csv").write_text("de,en\n" + "".join(f"Satz {i},sentence {i}\n" for i in range(rows)))
    reader = ParallelCorpus(path=str(tmp_path / "train.csv"), source="de", val_path=str(tmp_path / "val.csv"),
                            test_path=str(tmp_path / "test.csv"))
    assert [len(reader.read(s).pairs) for s in reader.splits] == [5, 2, 3]
    assert reader.read("val").pairs[1] == ("Satz 1", "sentence 1")


def test_separate_source_and_target_vocabularies_build_and_decode():
    from seq2seq.build import fit_tokenizers
    from seq2seq.module import Seq2SeqModule

    with pytest.raises(ConfigError, match="tokenizer=bpe_separate"):
        compose(["experiment=translate_ko_en", "tokenizer.tgt={name: char}"])
    config = compose(["experiment=translate_ko_en", "model=tiny", "model.share_embeddings=false",
                      "tokenizer=bpe_separate", "tokenizer.tgt.vocab_size=300", "tokenizer.src.vocab_size=500"])
    module = Seq2SeqModule(config, fit_tokenizers(config, CORPUS))
    assert module.src_tok is not module.tgt_tok and module.model.src_embed is not module.model.tgt_embed
    assert module.tgt_tok.decode(module.tgt_tok.encode("Inserts a table.").tolist()) == "Inserts a table."
    [ids] = Translator(module.eval()).tokens(["표를 삽입합니다."])
    assert ids and max(ids) < module.tgt_tok.vocab_size and module.tgt_tok.bos_id not in ids


def test_aligned_text_files_are_read_by_prefix_and_must_have_equal_line_counts(tmp_path):
    (tmp_path / "train.ko").write_text("표\n셀\n\n행\n")
    (tmp_path / "train.en").write_text("table\ncell\n\nrow\n")
    reader = ParallelCorpus(path=str(tmp_path / "train"), val_path=str(tmp_path / "train"),
                            test_path=str(tmp_path / "train"))
    train = reader.read("train")
    assert train.pairs == [("표", "table"), ("셀", "cell"), ("행", "row")] and dict(train.rejected) == {"blank line": 1}
    assert reader.files() == [str(tmp_path / f"train.{lang}") for lang in ("ko", "en")] * 3
    (tmp_path / "train.en").write_text("table\ncell\n")
    with pytest.raises(DataError, match=r"train\.en ends at line 2 and .*train\.ko goes on"):
        reader.read("train")
    with pytest.raises(DataError, match=r"no such file.*aligned text files are named by prefix"):
        ParallelCorpus(path=str(tmp_path / "dev")).files()


@pytest.mark.parametrize("suffix", [".tsv", ".tsv.gz", ".tsv.zst", ".parquet"])
def test_every_advertised_table_format_reads_the_same_rows(tmp_path, suffix):
    import pandas as pd
    import pyarrow as pa

    frame = pd.DataFrame({"ko": ["표", "셀", "NA"], "en": ["table", "cell", "null"], "split": ["train"] * 3})
    path = tmp_path / f"c{suffix}"
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        text = frame.to_csv(sep="\t", index=False).encode()
        codec = {".tsv": None, ".tsv.gz": "gzip", ".tsv.zst": "zstd"}[suffix]
        with pa.output_stream(str(path), compression=codec) as out:
            out.write(text)
    assert ParallelCorpus(path=str(path)).read("train").pairs == [("표", "table"), ("셀", "cell"), ("NA", "null")]


def test_a_null_parquet_cell_is_an_empty_side_rejected_by_reason_and_a_cut_short_file_is_named(tmp_path):
    import gzip

    import pandas as pd

    frame = pd.DataFrame({"ko": ["표", None, "셀"], "en": ["table", "x", "cell"], "split": ["train"] * 3})
    frame.to_parquet(tmp_path / "c.parquet")
    rows = ParallelCorpus(path=str(tmp_path / "c.parquet")).read("train")
    assert rows.pairs == [("표", "table"), ("셀", "cell")] and rows.rejected == {"empty source": 1}
    text = "ko\ten\tsplit\n" + "".join(f"문장 {i}\tsentence {i}\ttrain\n" for i in range(3000))
    packed = gzip.compress(text.encode())
    (tmp_path / "cut.tsv.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=r"cut.tsv.gz: .*the file is damaged or cut short"):
        ParallelCorpus(path=str(tmp_path / "cut.tsv.gz")).read("train")
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match=r"bad.parquet: not a readable Parquet file"):
        ParallelCorpus(path=str(tmp_path / "bad.parquet")).read("train")


def test_globs_and_lists_read_every_file_and_name_what_is_wrong(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.tsv").write_text(f"ko\ten\tsplit\n{name}\t{name}{name}\ttrain\n")
    reader = ParallelCorpus(path=str(tmp_path / "*.tsv"))
    assert reader.read("train").pairs == [("a", "aa"), ("b", "bb")]
    assert ParallelCorpus(path=[str(tmp_path / "b.tsv"), str(tmp_path / "a.tsv")]).read("train").pairs[0] == ("b", "bb")
    with pytest.raises(DataError, match=r"`data\.path=.*\*\.csv` matches no file"):
        ParallelCorpus(path=str(tmp_path / "*.csv")).files()
    (tmp_path / "c.tsv").write_text("ko\tenglish\tsplit\nc\tcc\ttrain\n")
    with pytest.raises(DataError, match=r"c\.tsv: missing column\(s\) \['en'\]"):
        reader.read("train")


def test_corpora_carry_their_weights_and_are_checked(tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.tsv").write_text(f"ko\ten\tsplit\n{name}\t{name}{name}\ttrain\n")
    reader = ParallelCorpus(corpora=[{"path": str(tmp_path / "a.tsv"), "weight": 3},
                                     {"path": str(tmp_path / "b.tsv")}])
    assert reader.corpus_weights == (3.0, 1.0)
    assert [(rows.corpus, rows.pairs) for rows in reader.stream(("train",))] == [(0, [("a", "aa")]),
                                                                                  (1, [("b", "bb")])]
    with pytest.raises(ConfigError, match=r"`data\.corpora\[0\]\.weight` must be a positive number"):
        ParallelCorpus(corpora=[{"path": "a.tsv", "weight": 0}])
    with pytest.raises(ConfigError, match=r"`data\.corpora\[0\]` takes `path` \(required\) and `weight`"):
        ParallelCorpus(corpora=[{"file": "a.tsv"}])
    with pytest.raises(ConfigError, match="not both"):
        ParallelCorpus(path="a.tsv", corpora=[{"path": "b.tsv"}])


def test_chrf_plus_plus_is_a_metric_a_command_line_can_ask_for():
    assert compose(["experiment=translate_ko_en", "metrics=[bleu,chrf++]"]).metrics == ["bleu", "chrf++"]
