import pytest

from seq2seq.errors import ConfigError, DataError
from seq2seq_plugins.synthetic import SymbolTokenizer, SyntheticTask


def test_splits_are_deterministic_and_distinct():
    a, b = SyntheticTask(n_train=50, seed=3), SyntheticTask(n_train=50, seed=3)
    assert a.read("train").pairs == b.read("train").pairs
    assert a.read("train").pairs[:20] != a.read("val").pairs[:20]
    assert SyntheticTask(n_train=50, seed=4).read("train").pairs != a.read("train").pairs


@pytest.mark.parametrize(("task", "check"), [
    ("copy", lambda xs, ys: ys == xs),
    ("reverse", lambda xs, ys: ys == xs[::-1]),
    ("sort", lambda xs, ys: ys == sorted(xs)),
])
def test_targets_follow_the_task(task, check):
    split = SyntheticTask(task=task, n_train=200, min_len=1, max_len=6).read("train")
    assert split.examples_read == 200
    for src, tgt in split.pairs:
        assert check(src.split(), tgt.split())
    assert len({len(src.split()) for src, _ in split.pairs}) == 6, "lengths vary, so batches need padding"


def test_addition_adds_the_two_halves_in_base_n():
    task = SyntheticTask(task="add", n_symbols=10, n_train=100, min_len=2, max_len=8)
    for src, tgt in task.read("train").pairs:
        xs = src.split()
        half = len(xs) // 2
        assert int("".join(tgt.split())) == int("".join(xs[:half])) + int("".join(xs[half:]))


def test_bad_options_and_blank_input_lines_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="data.task"):
        SyntheticTask(task="rotate")
    with pytest.raises(ConfigError, match="min_len"):
        SyntheticTask(min_len=5, max_len=2)
    path = tmp_path / "in.txt"
    path.write_text("1 2\n\n3\n")
    with pytest.raises(DataError, match=r"line\(s\) 2;"):
        SyntheticTask().read_inputs(str(path))


def test_an_error_quotes_a_short_excerpt_of_a_huge_input():
    tok = SymbolTokenizer()
    tok.fit(["1 2 3"])
    with pytest.raises(DataError) as caught:
        tok.encode("1 " * 500_000 + "x")
    message = str(caught.value)
    assert len(message) < 300 and "symbol 'x' in '1 1 1" in message and "(1,000,003 characters)" in message
