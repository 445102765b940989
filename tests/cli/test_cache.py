"""`isrsync cache ...` on an empty cache: one line saying what to do next."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

SEARCH = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
EXE = shutil.which("isrsync", path=SEARCH)
CLI = [EXE] if EXE else [sys.executable, "-m", "isrsync.cli.main"]


def cache_cmd(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISRSYNC_")}
    env.update(HOME=str(tmp_path), COLUMNS="60")  # narrow: the hint stays one line
    return subprocess.run(
        [*CLI, "--cache-dir", str(tmp_path / "cache"), "cache", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
        check=False,
    )


def _hint_lines(stdout: str) -> list[str]:
    return [ln for ln in stdout.splitlines() if "isrsync hoard PARCEL" in ln]


def test_info_of_an_empty_cache_says_how_to_fill_it(tmp_path: Path) -> None:
    r = cache_cmd(tmp_path, "info")
    assert r.returncode == 0, r.stderr
    assert "site id" in r.stdout  # the table is still there
    (hint,) = _hint_lines(r.stdout)
    assert hint.startswith("the cache is empty; ") and "isrsync ls" in hint, hint


def test_verify_of_an_empty_cache_says_how_to_fill_it(tmp_path: Path) -> None:
    r = cache_cmd(tmp_path, "verify")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("nothing to check: the cache is empty; "), r.stdout
    assert len(r.stdout.splitlines()) == 1 and len(_hint_lines(r.stdout)) == 1


def test_json_of_an_empty_cache_has_no_hint(tmp_path: Path) -> None:
    r = cache_cmd(tmp_path, "info", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["chunks"] == 0
    r = cache_cmd(tmp_path, "verify", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"checked": 0, "dropped": []}
