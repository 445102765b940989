"""The `sneakernet` entry point: version, help, and how errors become one line and an exit code.

sneakernet has its own runner (it reaches isrsync only through the Source
protocol and isrsync.errors), so these mirror the `isrsync` entry point's tests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from isrsync import __version__, errors
from sneakernet import cli as sncli


def _cmd() -> list[str]:
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    exe = shutil.which("sneakernet", path=search)
    return [exe] if exe else [sys.executable, "-m", "sneakernet.cli"]


def _sneakernet(*args: str, cmd: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISRSYNC_") and k != "FORCE_COLOR"}
    return subprocess.run([*(cmd or _cmd()), *args], capture_output=True, text=True, env={**env, "COLUMNS": "100"},
                          timeout=60, check=False)


def test_version() -> None:
    r = _sneakernet("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"sneakernet {__version__}\n", "")


def test_version_as_a_module() -> None:
    r = _sneakernet("--version", cmd=[sys.executable, "-m", "sneakernet.cli"])
    assert (r.returncode, r.stdout) == (0, f"sneakernet {__version__}\n")


def test_help() -> None:
    r = _sneakernet("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: sneakernet ")
    for opt in ("--debug", "--version", "--help"):
        assert opt in r.stdout


def test_usage_error() -> None:
    r = _sneakernet("--bogus")
    assert r.returncode == 2
    assert "No such option: --bogus" in r.stderr and "Usage: sneakernet" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout and r.stdout == ""


def test_does_not_load_the_isrsync_cli() -> None:
    """sneakernet reaches isrsync through the Source protocol and the error tree only."""
    code = "import sys, sneakernet.cli; print(sorted(m for m in sys.modules if m.startswith('isrsync.')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    loaded = eval(r.stdout)  # noqa: S307 - our own output
    assert not [m for m in loaded if m.startswith(("isrsync.cli", "isrsync.site.", "isrsync.server"))], loaded


# --------------------------------------------------------------------------
# run(): in process, on a throwaway app with the real root callback
# --------------------------------------------------------------------------


class Boom:
    exc: BaseException | None = None


@pytest.fixture
def boom(monkeypatch: pytest.MonkeyPatch) -> Boom:
    app = typer.Typer(name="sneakernet", add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)
    app.callback(invoke_without_command=True)(sncli.root)
    b = Boom()

    @app.command("boom")
    def boom_cmd() -> None:
        if b.exc is not None:
            raise b.exc
        print("fine")

    monkeypatch.setattr(sncli, "app", app)
    monkeypatch.delenv("ISRSYNC_DEBUG", raising=False)
    return b


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _captured(capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    cap = capsys.readouterr()
    return ANSI.sub("", cap.out), ANSI.sub("", cap.err).splitlines()


@pytest.mark.parametrize("cls", [errors.NotFound, errors.IntegrityError, errors.FormatError, errors.StorageFull,
                                 errors.UsageError])
def test_isr_error_is_one_line_and_its_exit_code(boom: Boom, capsys: pytest.CaptureFixture[str], cls) -> None:
    boom.exc = cls("the medium is odd", hint="do this instead")
    assert sncli.run(["boom"]) == cls.exit_code
    assert _captured(capsys) == ("", ["sneakernet: the medium is odd; do this instead"])


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(boom: Boom, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                   how: str) -> None:
    boom.exc = errors.Conflict("stale")
    if how == "env":
        monkeypatch.setenv("ISRSYNC_DEBUG", "1")
    assert sncli.run(["--debug", "boom"] if how == "flag" else ["boom"]) == errors.Conflict.exit_code
    err = _captured(capsys)[1]
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == f"sneakernet: stale; {errors.Conflict.hint}"


def test_the_entry_points_own_exit_codes(boom: Boom, capsys: pytest.CaptureFixture[str]) -> None:
    assert sncli.run(["boom"]) == 0
    assert _captured(capsys) == ("fine\n", [])
    boom.exc = RuntimeError("kaput")
    assert sncli.run(["boom"]) == 70
    err = _captured(capsys)[1]
    assert len(err) == 1 and err[0].startswith("sneakernet: internal error: RuntimeError: kaput") and "--debug" in err[0]
    boom.exc = EOFError()
    assert sncli.run(["boom"]) == 1
    assert _captured(capsys)[1][-1] == "sneakernet: aborted"  # click adds a newline first
    boom.exc = KeyboardInterrupt()
    assert sncli.run(["boom"]) == 130
    assert "Traceback" not in capsys.readouterr().err
    assert sncli.run(["boom", "--bogus"]) == 2


def test_run_without_argv_exits(boom: Boom, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    boom.exc = errors.NotFound("no parcel on this medium")
    monkeypatch.setattr(sys, "argv", ["sneakernet", "boom"])
    with pytest.raises(SystemExit) as exc_info:
        sncli.run()
    assert exc_info.value.code == errors.NotFound.exit_code
    assert _captured(capsys)[1] == ["sneakernet: no parcel on this medium"]
