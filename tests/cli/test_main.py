"""The `isrsync` entry point: version, help, usage errors, and how errors become exit codes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer

from isrsync import __version__, docgen, errors
from isrsync.cli import main
from isrsync.cli.state import state

# --------------------------------------------------------------------------
# The real CLI, as a subprocess
# --------------------------------------------------------------------------


def _locate() -> list[str]:
    # the venv running the tests first (it need not be on PATH), then PATH
    search = os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    )
    exe = shutil.which("isrsync", path=search)
    return [exe] if exe else [sys.executable, "-m", "isrsync.cli.main"]


CLI = _locate()


@pytest.fixture
def isrsync(tmp_path: Path) -> Iterator[Any]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ISRSYNC_") and k != "FORCE_COLOR"
    }
    env.update(ISRSYNC_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path), COLUMNS="100")

    def run(*args: str, cmd: list[str] = CLI) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, *args],
            check=False,
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=60,
        )

    yield run


def test_version(isrsync: Any) -> None:
    r = isrsync("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"isrsync {__version__}\n", "")


def test_version_as_a_module(isrsync: Any) -> None:
    r = isrsync("--version", cmd=[sys.executable, "-m", "isrsync.cli.main"])
    assert (r.returncode, r.stdout) == (0, f"isrsync {__version__}\n")


def test_help_lists_the_commands(isrsync: Any) -> None:
    r = isrsync("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Usage: isrsync ")
    assert re.search(r"^\s+cache\s", r.stdout, re.MULTILINE)
    for cmd in docgen.command_tree().subcommands:
        assert re.search(rf"^\s+{re.escape(cmd.name)}\b", r.stdout, re.MULTILINE), (
            cmd.name
        )
    for opt in ("--debug", "--cache-dir", "--version", "--help"):
        assert opt in r.stdout


def test_subcommand_help(isrsync: Any) -> None:
    r = isrsync("cache", "--help")
    assert r.returncode == 0, r.stderr
    assert (
        "Usage: isrsync cache " in r.stdout
        and "info" in r.stdout
        and "verify" in r.stdout
    )


def test_no_arguments_shows_help(isrsync: Any) -> None:
    r = isrsync()
    # click treats "no command" as a usage condition: the help, and exit status 2
    assert r.returncode == 2
    shown = r.stdout + r.stderr
    assert "Usage: isrsync " in shown and "Commands" in shown and "cache" in shown
    assert "--help" in shown and "Traceback" not in shown


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--bogus"], "No such option: --bogus"),
        (["cache", "info", "--bogus"], "No such option: --bogus"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["--cache-dir"], "Option '--cache-dir' requires an argument"),
    ],
)
def test_usage_errors(isrsync: Any, args: list[str], complaint: str) -> None:
    r = isrsync(*args)
    assert r.returncode == 2
    assert complaint in r.stderr
    if args != [
        "--cache-dir"
    ]:  # click has no context yet to show the usage line for that one
        assert "Usage: isrsync" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert r.stdout == ""


@pytest.mark.parametrize(
    ("args", "kind", "code"),
    [
        (["resume", "vm", "--json"], "AuthError", 12),  # no login yet: a real command's IsrError
        (["status", "--json"], None, None),  # works with no login: nothing to report as an error
        (["resume", "--json", "--bogus"], "UsageError", 2),  # click's usage error
    ],
)
def test_json_errors_come_as_one_json_line_on_stdout(isrsync: Any, args: list[str], kind: str | None,
                                                      code: int | None) -> None:
    import json

    r = isrsync(*args)
    if kind is None:
        assert r.returncode == 0, r.stderr
        assert "error" not in json.loads(r.stdout)
        return
    assert r.returncode == code
    lines = r.stdout.splitlines()
    assert len(lines) == 1, r.stdout
    doc = json.loads(lines[0])["error"]
    assert doc["type"] == kind and doc["exit_code"] == code and doc["message"], doc
    assert doc["message"] in r.stderr  # the line for whoever watches says the same
    assert "Traceback" not in r.stderr + r.stdout


def test_resume_refuses_an_unknown_memory_mode_before_doing_anything(isrsync: Any) -> None:
    r = isrsync("resume", "vm", "--memory", "sometimes")
    assert r.returncode == 2
    # --memory is a choice: the parser refuses the value and names the choices
    assert "--memory" in r.stderr and "'sometimes'" in r.stderr, r.stderr
    assert "'lazy'" in r.stderr and "'eager'" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout


# --------------------------------------------------------------------------
# The exception tree and its exit codes
# --------------------------------------------------------------------------

# The documented mapping (see man/isrsync.1, EXIT STATUS).
EXIT_CODES: dict[type[errors.IsrError], int] = {
    errors.IsrError: 1,
    errors.UsageError: 2,
    errors.UnsupportedEncoding: 2,
    errors.IntegrityError: 3,
    errors.FormatError: 3,
    errors.UnsupportedVersion: 3,
    errors.WrongPassphrase: 4,
    errors.NotFound: 5,
    errors.LockHeld: 6,
    errors.Conflict: 7,
    errors.Unreachable: 8,
    errors.Busy: 8,
    errors.TooManyUploads: 8,
    errors.RequestTimeout: 8,
    errors.BodyCut: 8,
    errors.PeerUnreachable: 8,
    errors.ChunkUnavailable: 8,
    errors.DamagedChunk: 8,
    errors.ChunkSlow: 8,
    errors.ChunkLate: 8,
    errors.StorageFull: 9,
    errors.CacheError: 10,
    errors.QemuError: 11,
    errors.AuthError: 12,
    errors.StateError: 13,
    errors.MediumError: 14,
    errors.DiscoveryError: 15,
}


def _tree(cls: type[errors.IsrError]) -> list[type[errors.IsrError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out += _tree(sub)
    return [c for c in out if c.__module__ == errors.__name__]


def test_exit_codes_follow_the_documented_mapping() -> None:
    assert {cls: cls.exit_code for cls in _tree(errors.IsrError)} == EXIT_CODES
    assert docgen.error_classes() == _tree(errors.IsrError)


def test_exit_codes_are_distinct_per_family() -> None:
    families = errors.IsrError.__subclasses__()
    codes = [f.exit_code for f in families]
    assert len(codes) == len(set(codes)), "two families of errors share an exit code"
    # none is taken by the base class or by the entry point's own codes (usage
    # errors deliberately share 2 with the command-line usage errors)
    assert not set(codes) & (
        {errors.IsrError.exit_code} | set(docgen.FIXED_EXIT_CODES) - {2}
    )
    for family in families:
        for member in _tree(family):
            assert member.exit_code == family.exit_code, (member, family)
            assert 0 < member.exit_code < 64


# --------------------------------------------------------------------------
# run(): in process, on a throwaway app with the real root callback
# --------------------------------------------------------------------------


class Boom:
    exc: BaseException | None = None


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch) -> Boom:
    """main.app replaced by a fresh app whose `boom` command raises ``Boom.exc``."""
    app = typer.Typer(
        name="isrsync",
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    app.callback()(main.root)
    boom = Boom()

    @app.command("boom")
    def boom_cmd() -> None:
        if boom.exc is not None:
            raise boom.exc
        main.out.print("fine")

    monkeypatch.setattr(main, "app", app)
    monkeypatch.delenv("ISRSYNC_DEBUG", raising=False)
    monkeypatch.setattr(state, "debug", state.debug)
    monkeypatch.setattr(state, "cache_dir", state.cache_dir)
    return boom


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _err_lines(capsys: pytest.CaptureFixture[str]) -> tuple[str, list[str]]:
    cap = capsys.readouterr()
    return ANSI.sub("", cap.out), ANSI.sub("", cap.err).splitlines()


def _cases() -> list[Any]:
    cases = []
    for cls in EXIT_CODES:
        cases.append(
            pytest.param(cls, "do this instead", id=f"{cls.__name__}-explicit-hint")
        )
        if cls.hint:
            cases.append(pytest.param(cls, None, id=f"{cls.__name__}-own-hint"))
    return cases


@pytest.mark.parametrize(("cls", "hint"), _cases())
def test_isr_errors_become_one_line_and_their_exit_code(
    cli: Boom,
    capsys: pytest.CaptureFixture[str],
    cls: type[errors.IsrError],
    hint: str | None,
) -> None:
    cli.exc = (
        cls("the thing broke", hint=hint)
        if hint is not None
        else cls("the thing broke")
    )
    code = main.run(["boom"])
    out, err = _err_lines(capsys)
    assert code == cls.exit_code == EXIT_CODES[cls]
    assert err == [f"isrsync: the thing broke; {hint or cls.hint}"]
    assert out == ""


def test_isr_error_without_a_hint(
    cli: Boom, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.exc = errors.NotFound("no parcel 'x'")
    assert main.run(["boom"]) == 5
    assert _err_lines(capsys)[1] == ["isrsync: no parcel 'x'"]


def test_isr_error_with_debug_shows_the_traceback(
    cli: Boom, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.exc = errors.Conflict("stale epoch")
    assert main.run(["--debug", "boom"]) == 7
    err = _err_lines(capsys)[1]
    assert err[0] == "Traceback (most recent call last):"
    assert err[-1] == f"isrsync: stale epoch; {errors.Conflict.hint}"


def test_unexpected_exception_is_an_internal_error(
    cli: Boom, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.exc = RuntimeError("kaput")
    assert main.run(["boom"]) == 70
    out, err = _err_lines(capsys)
    assert len(err) == 1 and err[0].startswith(
        "isrsync: internal error: RuntimeError: kaput"
    )
    assert "--debug" in err[0]
    assert out == ""


@pytest.mark.parametrize("how", ["flag", "env"])
def test_unexpected_exception_with_debug_prints_the_traceback(
    cli: Boom,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    cli.exc = RuntimeError("kaput")
    if how == "env":
        monkeypatch.setenv("ISRSYNC_DEBUG", "1")
    assert main.run(["--debug", "boom"] if how == "flag" else ["boom"]) == 70
    err = _err_lines(capsys)[1]
    assert err[0] == "Traceback (most recent call last):"
    assert "RuntimeError: kaput" in err
    assert any("raise boom.exc" in line for line in err)
    assert err[-1].startswith("isrsync: internal error: RuntimeError: kaput")


def test_the_entry_points_own_exit_codes(
    cli: Boom, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each exit code man/isrsync.1 documents for the entry point itself."""
    seen = {}
    cli.exc = None
    seen[0] = main.run(["boom"])
    assert _err_lines(capsys) == ("fine\n", [])
    cli.exc = EOFError()
    seen[1] = main.run(["boom"])
    assert _err_lines(capsys)[1][-1] == "isrsync: aborted"
    seen[2] = main.run(["boom", "--bogus"])
    assert "No such option: --bogus" in capsys.readouterr().err
    cli.exc = ZeroDivisionError("division by zero")
    seen[70] = main.run(["boom"])
    cli.exc = KeyboardInterrupt()
    seen[130] = main.run(["boom"])
    assert "Traceback" not in capsys.readouterr().err
    assert seen == {code: code for code in docgen.FIXED_EXIT_CODES}


def test_version_in_process(cli: Boom, capsys: pytest.CaptureFixture[str]) -> None:
    assert main.run(["--version"]) == 0
    assert _err_lines(capsys) == (f"isrsync {__version__}\n", [])


def test_run_without_argv_exits(
    cli: Boom, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli.exc = errors.LockHeld("parcel is locked by site b")
    monkeypatch.setattr(sys, "argv", ["isrsync", "boom"])
    with pytest.raises(SystemExit) as exc_info:
        main.run()
    assert exc_info.value.code == 6
    assert _err_lines(capsys)[1] == [
        f"isrsync: parcel is locked by site b; {errors.LockHeld.hint}"
    ]
