"""`isrsync login` without a terminal: what is missing is said at once, in one line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SEARCH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
EXE = shutil.which("isrsync", path=SEARCH)
CLI = [EXE] if EXE else [sys.executable, "-m", "isrsync.cli.main"]


def login_without_a_terminal(
    tmp_path: Path, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run `isrsync login ARGS` with stdin on /dev/null and no controlling
    terminal (a new session), as from cron or a CI job."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ISRSYNC_")}
    clean.update(
        ISRSYNC_CACHE=str(tmp_path / "cache"), HOME=str(tmp_path), COLUMNS="200", **env
    )
    return subprocess.run(
        [*CLI, "login", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=clean,
        cwd=tmp_path,
        timeout=60,
        start_new_session=True,
        check=False,
    )


# Nothing below reaches a server: the check comes before any connection.
SERVER = "https://isrsync.invalid"


@pytest.mark.parametrize(
    ("args", "env", "needs", "how"),
    [
        (
            [SERVER, "-u", "alice"],
            {},
            "a token and your passphrase",
            ["--token", "ISRSYNC_TOKEN", "ISRSYNC_PASSPHRASE"],
        ),
        (
            [SERVER, "-u", "alice"],
            {"ISRSYNC_PASSPHRASE": "pw"},
            "a token",
            ["--token", "ISRSYNC_TOKEN"],
        ),
        (
            [SERVER, "-u", "alice", "--token", "t"],
            {},
            "your passphrase",
            ["ISRSYNC_PASSPHRASE"],
        ),
        (
            [SERVER, "-u", "alice"],
            {"ISRSYNC_TOKEN": "t"},
            "your passphrase",
            ["ISRSYNC_PASSPHRASE"],
        ),
        (
            ["file:///nonexistent/home", "-u", "alice"],
            {},
            "your passphrase",
            ["ISRSYNC_PASSPHRASE"],
        ),
    ],
)
def test_login_without_a_terminal_says_what_is_missing(
    tmp_path: Path, args: list[str], env: dict[str, str], needs: str, how: list[str]
) -> None:
    r = login_without_a_terminal(tmp_path, *args, **env)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    line = lines[0]
    assert line.startswith("isrsync: login needs ") and "no terminal" in line, line
    assert f"login needs {needs} but" in line, line
    for way in how:
        assert way in line, (way, line)
    if "token" not in needs:
        assert "--token" not in line and "ISRSYNC_TOKEN" not in line, line
    if "passphrase" not in needs:
        assert "ISRSYNC_PASSPHRASE" not in line, line
    assert "Traceback" not in r.stderr and "aborted" not in r.stderr.lower()


# -- plain http -----------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["http://isrsync.invalid", "http://192.0.2.7:8443", "http://[2001:db8::1]/"])
def test_login_over_plain_http_to_another_host_is_refused_before_any_connection(tmp_path: Path, server: str) -> None:
    r = login_without_a_terminal(tmp_path, server, "-u", "alice", "--token", "t", ISRSYNC_PASSPHRASE="pw")
    assert r.returncode == 2, r.stderr
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line, line
    assert "plain http" in line and "in the clear" in line and "--insecure" in line and "https://" in line, line
    assert not (tmp_path / ".config").exists()  # nothing recorded


@pytest.mark.parametrize("server", ["http://127.0.0.1:1", "http://localhost:1", "http://[::1]:1", "https://isrsync.invalid"])
def test_loopback_http_and_https_pass_the_check(server: str) -> None:
    from isrsync.site.account import in_the_clear

    assert in_the_clear(server) is False
