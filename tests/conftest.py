import contextlib
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seq2seq import cli as seq2seq_cli
from seq2seq import compose, train
from seq2seq.model import EncoderDecoder
from seq2seq.testing import tiny_model

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The workers (`-n auto`, one a core) share the cores: one thread each, and for the processes they start. Two
    # threads a worker would leave threads spinning in OpenMP's barriers while the other worker holds the core.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)

# A text model trained two steps: as cheap as a real run through the pipeline gets.
TINY_TEXT = ["experiment=translate_ko_en", "tokenizer.src.vocab_size=300", "model=tiny", "trainer.max_steps=2",
             "trainer.max_time=null", "trainer.num_sanity_val_steps=0", "trainer.enable_progress_bar=false",
             "trainer.limit_val_batches=1", "trainer.limit_test_batches=1", "optim.ema_decay=null",
             "decode.max_len_b=4", "decode.max_len_a=0", "decode.beam=1"]


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker a core, at most 8 (each holds torch, Lightning and the models its tests train)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cores, 8)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`seq2seq *args` run in this process, as the console script runs it (a fresh Python start costs seconds of
    imports): its exit status, and what it printed to stdout and stderr. The logging handlers Hydra adds for the
    job (a file in its run directory among them) go with it, as they would with the process."""
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv, status = ["seq2seq", *args], 0
    handlers, level = list(logging.root.handlers), logging.root.level
    before = Path.cwd()
    try:
        os.chdir(cwd or before)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            seq2seq_cli.main()
    except SystemExit as exit:  # as the interpreter exits: a message is printed and means status 1
        status = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        if isinstance(exit.code, str):
            print(exit.code, file=err)
    finally:
        os.chdir(before)
        sys.argv = argv
        for handler in set(logging.root.handlers) - set(handlers):
            handler.close()
        logging.root.handlers[:], logging.root.level = handlers, level
    return subprocess.CompletedProcess(["seq2seq", *args], status, out.getvalue(), err.getvalue())


def text_corpus(folder, n=120):
    """A Korean-English TSV of `n` rows, a third of them in each split."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "corpus.tsv"
    path.write_text("ko\ten\tsplit\n" + "".join(
        f"문장 {i} 번{'입니다' * (i % 4)}\tsentence {i}{' again' * (i % 5)}\t{('train', 'val', 'test')[i % 3]}\n"
        for i in range(n)))
    return path


@pytest.fixture(scope="session")
def text_run(tmp_path_factory):
    """(its last checkpoint, its corpus, a file of two sources) of a text model trained two steps."""
    root = tmp_path_factory.mktemp("text_run")
    corpus = text_corpus(root / "data")
    train(compose([*TINY_TEXT, f"data.path={corpus}"]), root / "run")
    sources = root / "sources.ko"
    sources.write_text("문장 1 번\n문장 2 번입니다\n")
    return str(root / "run" / "checkpoints" / "last.ckpt"), corpus, sources


@pytest.fixture
def model() -> EncoderDecoder:
    return tiny_model()
