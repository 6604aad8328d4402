"""Decoding under control: forced prefixes, required and excluded phrases (seq2seq.guides)."""

import random

import pytest
import torch

from seq2seq.beam import beam_search
from seq2seq.decoding import Decoder, DecodeSpec, greedy
from seq2seq.errors import DataError
from seq2seq.guides import Guide, Term, matching_terms, read_glossary, term_usage
from seq2seq.search import strip
from seq2seq.testing import BOS, EOS, PAD, Favour, random_batch, tiny_model
from seq2seq.testing import VOCAB as V


class _Forced(torch.nn.Module):
    """The model made to emit `prefix` first: at those positions every other token is impossible. A search over
    it is the reference for "search from that prefix"."""

    def __init__(self, model: torch.nn.Module, prefix: list[int]) -> None:
        super().__init__()
        self.model, self.prefix = model, prefix

    @property
    def device(self) -> torch.device:
        return self.model.device

    def encode(self, src, src_keep):
        return self.model.encode(src, src_keep)

    def start_decoding(self, *args, **kwargs):
        return self.model.start_decoding(*args, **kwargs)

    def decode_step(self, tokens, state):
        at = state.position
        logits = self.model.decode_step(tokens, state)
        if at < len(self.prefix):
            logits = torch.full_like(logits, float("-inf"))
            logits[:, self.prefix[at]] = 0.0
        return logits


def _contains(row: list[int], phrase: tuple[int, ...]) -> bool:
    return any(tuple(row[i : i + len(phrase)]) == phrase for i in range(len(row) - len(phrase) + 1))


def _prefix_logprob(model, src, src_keep, prefix: list[int]) -> float:
    tgt_in = torch.tensor([[BOS, *prefix[:-1]]])
    logp = model(src, src_keep, tgt_in, torch.ones_like(tgt_in, dtype=torch.bool)).log_softmax(-1)
    return float(logp[0, torch.arange(len(prefix)), prefix].sum().detach())


@pytest.mark.parametrize("beam", [1, 4])
def test_no_guides_and_empty_guides_search_token_for_token_alike(beam):
    model = tiny_model(seed=5)
    src, src_keep, _, _ = random_batch()
    plain = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, beam=beam, n_best=beam)
    empty = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, beam=beam, n_best=beam,
                        guides=[Guide()] * 4)
    assert torch.equal(plain.tokens, empty.tokens)
    torch.testing.assert_close(plain.scores, empty.scores)
    # Rows without guides are untouched by their neighbours' constraints.
    mixed = [Guide(), Guide(prefix=(7, 8), include=((9, 10),)), Guide(), Guide(include=((11,),), exclude=((5,),))]
    out = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, beam=beam, n_best=beam, guides=mixed)
    for row in (0, 2):
        assert torch.equal(out.tokens[row], plain.tokens[row])
        torch.testing.assert_close(out.scores[row], plain.scores[row])


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_prefix_is_always_honoured_and_the_rest_is_the_search_from_it(use_cache):
    src, src_keep, _, _ = random_batch()
    prefixes = [(5, 6, 7), (9,), (), (12, 12, 4, 3)]
    for seed in range(3):
        model = tiny_model(seed=seed)
        model.head = Favour(model.head, [EOS], 2.5)  # outputs of varied lengths
        guides = [Guide(prefix=p) for p in prefixes]
        found = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=10, beam=3, n_best=3, guides=guides,
                            use_cache=use_cache)
        best = greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=10, guides=guides, use_cache=use_cache)
        for b, prefix in enumerate(prefixes):
            one = (src[b : b + 1], src_keep[b : b + 1])
            forced = _Forced(model, list(prefix))
            ref = beam_search(forced, *one, bos=BOS, eos=EOS, max_len=10, beam=3, n_best=3)
            assert strip(found.tokens[b], EOS) == strip(ref.tokens[0], EOS)  # (the batch's padding is wider)
            assert (found.tokens[b, :, : len(prefix)] == torch.tensor(prefix, dtype=torch.long)).all()
            offset = _prefix_logprob(model, *one, list(prefix)) if prefix else 0.0
            torch.testing.assert_close(found.scores[b] - ref.scores[0], torch.full((3,), offset), atol=1e-4, rtol=0)
            ref_greedy = greedy(forced, *one, bos=BOS, eos=EOS, max_len=10)
            assert torch.equal(best[b], ref_greedy[0])


def test_a_prefix_is_honoured_even_where_a_ban_would_refuse_its_tokens():
    model = tiny_model(seed=2)
    src, src_keep, _, _ = random_batch()
    guides = [Guide(prefix=(6, 6, 6, 6))] * 4  # repeats a bigram: no_repeat_ngram=2 would ban it
    for out in (greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=8, no_repeat_ngram=2, guides=guides),
                beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=8, beam=3, no_repeat_ngram=2,
                            guides=guides).tokens[:, 0]):
        assert (out[:, :4] == 6).all()


def _random_guides(rng: random.Random, n: int, *, prefix: bool = False) -> list[Guide]:
    def phrase() -> tuple[int, ...]:
        return tuple(rng.randrange(3, V) for _ in range(rng.randint(1, 3)))

    return [Guide(prefix=phrase() if prefix and rng.random() < 0.5 else (),
                  include=tuple(phrase() for _ in range(rng.randint(0, 3)))) for _ in range(n)]


@pytest.mark.parametrize("beam", [1, 3, 6])
def test_satisfiable_required_phrases_always_appear(beam):
    rng = random.Random(beam)
    src, src_keep, _, _ = random_batch()
    for seed in range(6):
        model = tiny_model(seed=seed)
        model.head = Favour(model.head, [EOS], 4.0)  # a model that would rather stop at once
        guides = _random_guides(rng, 4, prefix=seed % 2 == 1)
        for use_cache in (True, False):
            found = beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=4 + sum(g.required_tokens + len(
                g.prefix) for g in guides), beam=beam, guides=guides, use_cache=use_cache)
            rows = strip(found.tokens[:, 0], EOS)
            for row, guide in zip(rows, guides, strict=True):
                assert row[: len(guide.prefix)] == list(guide.prefix)
                assert all(_contains(row, p) for p in guide.include), (row, guide)
            if use_cache:
                cached = found.tokens
            else:
                assert torch.equal(cached, found.tokens)


def test_the_decoder_gives_required_phrases_room_and_searches_for_them_even_at_beam_one():
    model = tiny_model(seed=1)
    model.head = Favour(model.head, [EOS], 6.0)
    src, src_keep, _, _ = random_batch()
    decoder = Decoder(DecodeSpec(max_len_a=0.0, max_len_b=1), BOS, EOS, PAD, V)  # a budget of one token
    guides = [Guide(include=((5, 6, 7), (8,))), Guide(), Guide(prefix=(9, 9), include=((10, 11),)), Guide()]
    rows = strip(decoder(model, src, src_keep, guides), EOS)
    assert _contains(rows[0], (5, 6, 7)) and _contains(rows[0], (8,))
    assert rows[2][:2] == [9, 9] and _contains(rows[2], (10, 11))
    assert rows[1] == rows[3] == []  # the EOS-loving model stops at once where nothing is required


def test_excluded_phrases_never_appear_though_the_model_favours_them():
    src, src_keep, _, _ = random_batch()
    for seed in range(3):
        model = tiny_model(seed=seed)
        model.head = Favour(model.head, [7, 8], 5.0)
        plain = strip(greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=12), EOS)
        assert any(7 in r for r in plain)  # without the exclusion the model does emit them
        guides = [Guide(exclude=((7,), (8, 8)))] * 4
        for out in (greedy(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, guides=guides),
                    beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, beam=4, n_best=4,
                                guides=guides).tokens.flatten(0, 1)):
            for row in strip(out, EOS):
                assert 7 not in row and not _contains(row, (8, 8)), row


def test_required_and_excluded_phrases_together_with_a_prefix():
    model = tiny_model(seed=4)
    model.head = Favour(model.head, [12], 3.0)
    src, src_keep, _, _ = random_batch()
    guides = [Guide(prefix=(3,), include=((12, 13),), exclude=((12, 12),))] * 4
    for row in strip(beam_search(model, src, src_keep, bos=BOS, eos=EOS, max_len=12, beam=4,
                                 guides=guides).tokens[:, 0], EOS):
        assert row[0] == 3 and _contains(row, (12, 13)) and not _contains(row, (12, 12)), row


def test_an_empty_phrase_is_refused():
    with pytest.raises(DataError, match="`include` phrase is empty"):
        Guide(include=((),))
    with pytest.raises(DataError, match="`exclude` phrase is empty"):
        Guide(exclude=((4,), ()))


def test_translator_guides_name_the_input_whose_phrase_is_empty():
    from seq2seq import Translator
    from seq2seq.testing import build

    translator = Translator(build(["experiment=reverse", "model.d_model=32", "model.d_ff=64"], 8)[0])
    with pytest.raises(DataError, match=r"input 2: an `include` phrase is empty"):
        translator.guides(2, include=[["1"], [" "]])
    with pytest.raises(DataError, match=r"1 prefixes for 2 inputs"):
        translator.guides(2, prefixes=["1"])


def test_a_glossary_line_without_a_tab_or_with_an_empty_term_is_refused_by_line(tmp_path):
    (tmp_path / "g.tsv").write_text("서울\tSeoul\n\n부산 Busan\n\tempty\n대구\t \n")
    with pytest.raises(DataError, match=r"3 bad line\(s\): line 3: 0 tabs.*line 4: empty source term; "
                                        r"line 5: empty target term"):
        read_glossary(tmp_path / "g.tsv")
    (tmp_path / "ok.tsv").write_text("서울\tSeoul\n")
    assert [(t.source, t.target) for t in read_glossary(tmp_path / "ok.tsv")] == [("서울", "Seoul")]


def test_a_glossary_term_matches_where_it_starts_a_word():
    term = Term("cat", "Katze")
    assert term.occurs_in("the cat sat") and term.occurs_in("cats.") and term.occurs_in("cat")
    assert not term.occurs_in("concat") and not term.occurs_in("the dog")
    assert matching_terms(["서울에서 왔다", "부산"], [Term("서울", "Seoul"), Term("왔", "came")]) == [
        [Term("서울", "Seoul"), Term("왔", "came")], []]
    assert term_usage(["from Seoul", "nothing"], [[Term("서울", "Seoul")], [Term("x", "y")]]) == (1, 2)
