import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_core_model_example_runs():
    out = _run("core_model.py")
    assert "teacher-forced logits: (2, 3, 100)" in out


@pytest.mark.slow  # it trains for an epoch
def test_train_reverse_example_runs_and_the_reloaded_model_agrees():
    out = _run("train_reverse.py", "trainer.max_epochs=1", "data.n_train=512", "data.n_val=64", "data.n_test=64")
    lines = {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in out.splitlines() if ":" in line}
    assert lines["in memory"] == lines["reloaded"]
