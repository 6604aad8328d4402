"""Cross-attention heatmaps: source tokens × output tokens, last decoder layer, mean over heads."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display
import matplotlib.pyplot as plt
from matplotlib import font_manager

from seq2seq.domain import Decodes

log = logging.getLogger(__name__)
HANGUL_FONTS = ("NanumGothic", "Noto Sans CJK KR", "Noto Sans KR", "UnDotum", "Baekmuk Gulim", "Unifont")


def _font() -> str | None:
    installed = {f.name for f in font_manager.fontManager.ttflist}
    found = next((name for name in HANGUL_FONTS if name in installed), None)
    if found is None:
        log.warning("no font with Hangul glyphs is installed (e.g. Debian's fonts-nanum): Korean tick labels "
                    "will show as boxes")
    return found


def plot_attention(translator: Decodes, sources: list[str], path: Path) -> None:
    """One heatmap per source sentence (its decoded output, EOS included), saved together as one PNG."""
    font = _font()
    src_tok, tgt_tok = translator.src_tok, translator.tgt_tok
    fig, axes = plt.subplots(len(sources), 1, figsize=(8, 3.2 * len(sources)), squeeze=False)
    for ax, source, ids in zip(axes[:, 0], sources, translator.tokens(sources), strict=True):
        out = [*ids, tgt_tok.eos_id]  # the decoded output, EOS included
        weights = translator.cross_attention(source, out).mean(0)  # (T, S), the heads' mean
        ax.imshow(weights.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(weights.shape[1]), src_tok.pieces(src_tok.encode(source).tolist()), rotation=90,
                      fontsize=7, fontname=font)
        ax.set_yticks(range(weights.shape[0]), tgt_tok.pieces(out[: weights.shape[0]]), fontsize=7)
        ax.set(xlabel="source tokens", ylabel="output tokens")
    with warnings.catch_warnings():  # one warning about the font is enough, not one per missing glyph
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
