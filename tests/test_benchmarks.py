"""The benchmarks that must run where the project is tested: their CPU fallbacks, end to end."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow  # trains twice (eager, compiled) and decodes
def test_the_gpu_benchmark_runs_its_cpu_fallback_and_fills_its_table():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_train.py"), "--cpu"], capture_output=True,
                            text=True, timeout=600, cwd=BENCHMARKS)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split("|")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("| ")}
    for name in ("train, eager", "train, compiled", "decode, greedy", "decode, beam 4"):
        throughput = re.search(r"\| (\d+) (target|output) tok/s", rows[name])
        assert throughput and int(throughput.group(1)) > 0, rows[name]
    assert re.search(r"MFU \d+\.\d%", rows["train, compiled"]) and "recompiles" in rows["train, compiled"]
    assert "n/a (CPU" in rows["beam cache reorder"]
