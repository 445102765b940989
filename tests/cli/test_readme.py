"""The README's commands name real commands and options: every `isrsync ...` line in
its shell blocks parses (checked with --help on the command, and its options
against that command's help)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from typer.testing import CliRunner

from isrsync.cli.main import app

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_commands() -> list[list[str]]:
    text = README.read_text()
    cmds = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("isrsync "):
                cmds.append(shlex.split(line)[1:])
    return cmds


def test_every_readme_command_and_option_exists() -> None:
    cmds = _readme_commands()
    assert len(cmds) >= 15, cmds
    runner = CliRunner()
    for argv in cmds:
        # The command path: words up to the first option or argument that is not a subcommand.
        path: list[str] = []
        for w in argv:
            if w.startswith("-"):
                break
            r = runner.invoke(app, [*path, w, "--help"])
            if r.exit_code != 0:
                break
            path.append(w)
        assert path, argv
        r = runner.invoke(app, [*path, "--help"])
        assert r.exit_code == 0, (argv, r.output)
        for opt in (w.split("=", 1)[0] for w in argv if w.startswith("--")):
            assert opt in r.output, (argv, opt, r.output)
