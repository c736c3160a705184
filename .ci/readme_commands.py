"""Print one of README.md's two first-screen commands, so that CI runs exactly what a new user pastes.

    python3 .ci/readme_commands.py install    # the first ```bash block: install, then `sata replicate`
    python3 .ci/readme_commands.py test       # the second: the test command

tests/test_readme.py reads README through the same function.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
# what each of the first two bash blocks must hold: a reordered README fails loudly, never runs the wrong line
EXPECTED = {"install": "pip install", "test": "pytest"}


def code_blocks(text: str, language: str) -> list[str]:
    """The bodies of the fenced ```language blocks of a Markdown text, in order."""
    return [m.group(1) for m in re.finditer(rf"^```{language}\n(.*?)^```$", text, flags=re.S | re.M)]


def first_screen_commands(text: str) -> dict[str, str]:
    """``{"install": ..., "test": ...}``: the first two bash blocks of README, one line each."""
    blocks = code_blocks(text, "bash")[:2]
    commands = dict(zip(EXPECTED, (b.strip() for b in blocks)))
    for name, must in EXPECTED.items():
        line = commands.get(name, "")
        if must not in line or "\n" in line:
            raise SystemExit(f"README.md: bash block {list(EXPECTED).index(name) + 1} should be the one-line "
                             f"{name} command (with {must!r}), found {line!r}")
    return commands


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in EXPECTED:
        raise SystemExit(f"usage: {sys.argv[0]} {{{'|'.join(EXPECTED)}}}")
    print(first_screen_commands(README.read_text())[sys.argv[1]])
