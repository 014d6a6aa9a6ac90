"""The README's commands are copied as they stand: their commands, flags and configs must exist."""

import re
import shlex
from pathlib import Path

from gdistill.cli import build_parser
from gdistill.config import load_config

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _commands() -> list[list[str]]:
    """Every `gdistill ...` command of the README's bash blocks, continuations joined and
    comments dropped, as argument lists after `gdistill`."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        text = "\n".join(line.split("#", 1)[0] for line in block.splitlines()).replace("\\\n", " ")
        for line in text.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part)
                if "gdistill" in words and "..." not in words:
                    found.append(words[words.index("gdistill") + 1 :])
    return found


def test_every_readme_command_parses():
    commands = _commands()
    assert {c[0] for c in commands} >= {"demo", "split", "train", "distill", "eval"}
    parser = build_parser()
    for argv in commands:
        args, rest = parser.parse_known_args(argv)
        unknown = [a for a in rest if "=" not in a or a.startswith("-")]
        assert not unknown, (argv, unknown)


def test_every_config_named_in_the_readme_loads():
    named = {c[c.index("--config") + 1] for c in _commands() if "--config" in c}
    assert "coco_r50" in named
    for name in named:
        load_config(name)
