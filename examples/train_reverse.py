"""Train a sequence reverser from Python, then decode with it and with a reloaded checkpoint.

    python examples/train_reverse.py                        # about two minutes on a laptop CPU
    python examples/train_reverse.py trainer.max_epochs=1   # any Hydra override
"""

import json
import sys
import tempfile
from pathlib import Path

import seq2seq

config = seq2seq.compose(["experiment=reverse", "trainer.enable_progress_bar=false", *sys.argv[1:]])
run_dir = Path(tempfile.mkdtemp(prefix="reverse-"))
module = seq2seq.train(config, run_dir)  # fits, keeps the best weights, writes run_dir/metrics.json
metrics = json.loads((run_dir / "metrics.json").read_text())

sources = ["1 2 3 4 5", "9 8 7", "4 4 0 2"]
print("in memory:", seq2seq.Translator(module).translate(sources))
reloaded = seq2seq.Translator.from_checkpoint(metrics["best_checkpoint"])
print("reloaded: ", reloaded.translate(sources))
print("beam of 4:", reloaded.with_decoding(beam=4).translate(sources))
print("val exact match:", metrics["val/exact_match"])
