"""Issue 13, part 1: long steps tell their progress in plain lines when stderr is no
terminal (a log, a pipe), nothing but the final object under --json. Real
`isrsync init` and `isrsync hoard` against a real `isrsync serve`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ISRSYNC = [sys.executable, "-m", "isrsync.cli.main"]


def _site(root: Path, name: str) -> dict[str, str]:
    d = root / name
    d.mkdir()
    return {**os.environ, "ISRSYNC_CACHE": str(d / "cache"), "ISRSYNC_CONFIG": str(d / "config.json"),
            "ISRSYNC_RUNTIME": str(d / "run"), "ISRSYNC_PASSPHRASE": "correct horse battery"}


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([*ISRSYNC, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return r


def test_init_and_hoard_tell_their_progress_in_plain_lines_without_a_terminal(live_server, tmp_path: Path) -> None:
    token = live_server.add_user("alice")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(24 << 20))  # incompressible: the upload is the image's size
    a, b = _site(tmp_path, "a"), _site(tmp_path, "b")
    for env in (a, b):
        _run(env, "login", live_server.url, "--user", "alice", "--token", token, "--kdf-min")

    made = _run(a, "init", "vm", "--image", str(image))
    lines = made.stderr.splitlines()
    assert "\x1b[" not in made.stderr, "no terminal: no escape sequences"
    enc = [ln for ln in lines if ln.startswith("encoding: ")]
    up = [ln for ln in lines if ln.startswith("uploading: ")]
    assert enc[0] == "encoding: starting", lines
    assert enc and enc[-1] == "encoding: 24.0 MiB of 24.0 MiB (100%), done", lines
    assert up and up[-1].endswith("(100%), done") and re.match(r"uploading: 2\d\.\d MiB of 2\d\.\d MiB", up[-1]), lines
    # A line per tenth at most, not one per chunk.
    assert len(enc) <= 12 and len(up) <= 12, lines
    assert "created at version 1" in made.stdout

    hoarded = _run(b, "hoard", "vm")
    got = [ln for ln in hoarded.stderr.splitlines() if ln.startswith("hoarding version 1: ")]
    assert got and got[-1].endswith("(100%), done"), hoarded.stderr
    assert "Traceback" not in hoarded.stderr + made.stderr

    quiet = _run(b, "hoard", "vm", "--json")
    assert quiet.stderr == "", quiet.stderr
    json.loads(quiet.stdout)
