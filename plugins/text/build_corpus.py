"""Build a parallel corpus from LibreOffice's help pages, aligned by paragraph id (Debian packages, MPL-2.0).

    python -m seq2seq_plugins.text.build_corpus [--lang ko] [--out PATH] [--workdir DIR]

Downloads `libreoffice-help-<lang>` and `libreoffice-help-en-us` with `apt-get download` (no install), unpacks
them, and pairs every paragraph (`par_id…`, `hd_id…`) that has the same page and id in both languages. Pairs whose
source side is left untranslated (for Korean: no Hangul) or empty are dropped, exact duplicates are kept once, and
each pair gets a fixed split from a hash of its source text: about 1,000 pairs each for `val` and `test`.
Other languages: `--lang de|fr|es|ja` (the untranslated check then compares with the English side).
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd

DEFAULT_OUT = Path(__file__).parent / "data"
HANGUL = re.compile(r"[\uac00-\ud7a3]")
PARAGRAPH_ID = re.compile(r"^(par|hd)_id")
HELD_OUT = 1000  # pairs per held-out split, in expectation


class _Paragraphs(HTMLParser):
    """Text of each element whose id is a paragraph id, inline markup flattened."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: dict[str, str] = {}
        self._open: list[tuple[str, str, int, list[str]]] = []  # (id, tag, depth, parts)
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self._depth += 1
        pid = dict(attrs).get("id") or ""
        if PARAGRAPH_ID.match(pid) and not self._open:
            self._open.append((pid, tag, self._depth, []))

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][1] == tag and self._open[-1][2] == self._depth:
            pid, _, _, parts = self._open.pop()
            text = " ".join("".join(parts).split())
            if text:
                self.found.setdefault(pid, text)
        self._depth -= 1

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1][3].append(data)


def paragraphs(root: Path) -> dict[tuple[str, str], str]:
    out = {}
    for page in sorted(root.glob("text/**/*.html")):
        parser = _Paragraphs()
        parser.feed(page.read_text(encoding="utf-8", errors="replace"))
        for pid, text in parser.found.items():
            out[(str(page.relative_to(root)), pid)] = text
    return out


def unpack(lang: str, workdir: Path) -> Path:
    packages = [f"libreoffice-help-{lang}", "libreoffice-help-en-us"]
    subprocess.run(["apt-get", "download", *packages], cwd=workdir, check=True, capture_output=True)
    for deb in workdir.glob("*.deb"):
        subprocess.run(["dpkg", "-x", str(deb), str(workdir / "root")], check=True)
    return workdir / "root" / "usr" / "share" / "libreoffice" / "help"


def split_of(text: str) -> str:
    bucket = int(hashlib.sha1(text.encode()).hexdigest(), 16) % 10_000
    return "val" if bucket < 550 else "test" if bucket < 1100 else "train"


def build(lang: str, help_root: Path) -> pd.DataFrame:
    src, en = paragraphs(help_root / lang), paragraphs(help_root / "en-US")
    rows = []
    for key, text in src.items():
        target = en.get(key)
        translated = HANGUL.search(text) if lang == "ko" else text != target
        if target and translated:
            rows.append((text, target))
    frame = pd.DataFrame(rows, columns=[lang, "en"]).drop_duplicates(ignore_index=True)
    return frame.assign(split=frame[lang].map(split_of))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lang", default="ko")
    parser.add_argument("--out", type=Path, default=None, help="default: data/libreoffice_help_<lang>_en.tsv.gz")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the downloads here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        frame = build(args.lang, unpack(args.lang, workdir))
    out = args.out or DEFAULT_OUT / f"libreoffice_help_{args.lang}_en.tsv.gz"
    frame.to_csv(out, sep="\t", index=False)
    print(f"wrote {len(frame)} pairs to {out}: {frame['split'].value_counts().to_dict()}")


if __name__ == "__main__":
    main()
