"""Cross-attention heatmaps: source tokens × output tokens, last decoder layer, mean over heads."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt
import torch
from matplotlib import font_manager

log = logging.getLogger(__name__)
HANGUL_FONTS = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans KR", "UnDotum", "Baekmuk Gulim", "Unifont")


def _font() -> str | None:
    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in HANGUL_FONTS if name in installed), None)
    if found is None:
        log.warning("no font with Hangul glyphs is installed (e.g. Debian's fonts-nanum): Korean tick labels "
                    "will show as boxes")
    return found


def plot_attention(module: Any, sources: list[str], path: Path) -> None:
    """One heatmap per source sentence (greedy output), saved together as one PNG."""
    font = _font()
    src_tok, tgt_tok = module.src_tok, module.tgt_tok
    fig, axes = plt.subplots(len(sources), 1, figsize=(8, 3.2 * len(sources)), squeeze=False)
    for ax, (_, batch) in zip(axes[:, 0], (next(module.source_batches([s], 1)) for s in sources), strict=True):
        out = module.decode_tokens(batch.src, batch.src_keep)[0].tolist()
        out = out[: out.index(tgt_tok.eos_id) + 1] if tgt_tok.eos_id in out else out
        tgt_in = torch.tensor([[tgt_tok.bos_id, *out[:-1]]], device=batch.src.device)
        weights = module.model.cross_attention(batch.src, batch.src_keep, tgt_in)[0].mean(0).cpu()  # (T, S)
        ax.imshow(weights.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(weights.shape[1]), src_tok.pieces(batch.src[0].tolist()), rotation=90, fontsize=7,
                      fontname=font)
        ax.set_yticks(range(weights.shape[0]), tgt_tok.pieces(out), fontsize=7)
        ax.set(xlabel="source tokens", ylabel="output tokens")
    with warnings.catch_warnings():  # one warning about the font is enough, not one per missing glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
