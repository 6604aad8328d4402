"""What the README and docs/ show a user to type exists: every `seq2seq <command> key=value ...` line of their code
blocks names a command, and every key and config group option it gives is one that command accepts."""

import re
import shlex
from pathlib import Path

import pytest

from seq2seq.cli import COMMANDS
from seq2seq.config import prepare_overrides
from seq2seq.errors import ConfigError

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def command_lines(text: str) -> list[str]:
    """The `seq2seq ...` invocations inside the page's code blocks, without comments and pipes; blocks that show a
    mistake and its message (`seq2seq: error:`) and lines with a `<placeholder>` are left out."""
    found = []
    for block in re.findall(r"```(?:bash|console|sh)?\n(.*?)```", text, re.S):
        if "seq2seq: error:" in block:
            continue
        for line in block.replace("\\\n", " ").splitlines():
            if "<" in line:
                continue
            line = line.split(" # ")[0]
            for part in re.split(r"\||&&", line):
                at = part.find("seq2seq ")
                if at >= 0 and not part[:at].strip().endswith(("pip", "-e", "import")):
                    found.append(part[at:].strip())
    return found


CASES = [(page.relative_to(ROOT).as_posix(), line) for page in PAGES for line in command_lines(page.read_text())
         if re.fullmatch(r"[a-z]+", (line.split()[1:2] or ["-"])[0])]


def test_the_pages_show_commands():
    assert len(CASES) > 30 and {line.split()[1] for _, line in CASES} >= {"train", "translate", "evaluate", "export"}


@pytest.mark.parametrize(("page", "line"), CASES)
def test_every_command_and_option_the_docs_show_exists(page, line):
    words = shlex.split(line)[1:]
    command, args = words[0], words[1:]
    if command == "plugins":
        return
    assert command in COMMANDS, f"{page}: `seq2seq {command}` is no command"
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        prepare_overrides(overrides, command)
    except ConfigError as err:
        pytest.fail(f"{page}: `{line}`: {err}")
