"""`isrsync cache ...` through the real console script, against caches filled by the API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from isrsync.chunk import encode
from isrsync.pack import PackWriter
from isrsync.site.cache import ENV_CACHE, SiteCache


def _isrsync_cmd() -> list[str]:
    exe = shutil.which("isrsync") or shutil.which(
        "isrsync",
        path=os.path.dirname(sys.executable),  # the venv's scripts, when not on PATH
    )
    return [exe] if exe else [sys.executable, "-m", "isrsync.cli.main"]


CMD = _isrsync_cmd()


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if k not in (ENV_CACHE, "ISRSYNC_DEBUG")}
    e.update(env or {})
    return subprocess.run(
        [*CMD, *args], capture_output=True, text=True, env=e, timeout=60, check=False
    )


@pytest.fixture
def filled(tmp_path, secret):
    """A cache with 5 segment chunks and a 3-chunk pack, stored through the API."""
    root = tmp_path / "cache"
    chunks = [encode(os.urandom(n), secret) for n in (100, 2000, 9000, 50000, 131072)]
    packed = [encode(os.urandom(3000 + i), secret) for i in range(3)]
    with SiteCache(root) as c:
        assert c.put_many([(e.tag, e.data) for e in chunks]) == 5
        src = root / "incoming.pack"
        with open(src, "wb") as f:
            w = PackWriter(f)
            for e in packed:
                w.add(e.tag, e.data)
            info = w.finish()
        c.add_pack(src, info.pack_id)
        site_id = c.site_id
    return root, site_id, chunks, packed


def _flip_chunk(root: Path, chunk) -> None:
    for seg in (root / "segments").iterdir():
        data = bytearray(seg.read_bytes())
        i = data.find(chunk.data)
        if i >= 0:
            data[i + 7] ^= 0x55
            seg.write_bytes(bytes(data))
            return
    raise AssertionError("chunk not found in any segment")


def test_info_json_matches_api(filled):
    root, site_id, chunks, packed = filled
    r = run_cli("--cache-dir", str(root), "cache", "info", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["site_id"] == site_id
    assert info["chunks"] == len(chunks) + len(packed)
    assert info["chunk_bytes"] == sum(len(e.data) for e in chunks + packed)
    assert info["packs"] == 1
    assert info["segments"] == 1
    assert info["path"] == str(root)
    assert info["disk_bytes"] >= info["chunk_bytes"]
    assert r.stderr == ""


def test_info_via_env_and_flag_beats_env(filled, tmp_path):
    root, site_id, _, _ = filled
    r = run_cli("cache", "info", "--json", env={ENV_CACHE: str(root)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["site_id"] == site_id
    other = tmp_path / "other"
    r = run_cli(
        "--cache-dir", str(other), "cache", "info", "--json", env={ENV_CACHE: str(root)}
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["path"] == str(other)
    assert info["site_id"] != site_id
    assert info["chunks"] == 0


def test_info_human(filled):
    root, site_id, chunks, packed = filled
    r = run_cli("--cache-dir", str(root), "cache", "info")
    assert r.returncode == 0, r.stderr
    assert site_id in r.stdout
    assert str(root) in r.stdout
    assert f"{len(chunks) + len(packed)} (" in r.stdout


def test_verify_reports_damage(filled):
    root, _, chunks, packed = filled
    total = len(chunks) + len(packed)
    r = run_cli("--cache-dir", str(root), "cache", "verify")
    assert r.returncode == 0, r.stderr
    assert f"checked {total} chunks: all verify" in r.stdout

    _flip_chunk(root, chunks[2])
    r = run_cli("--cache-dir", str(root), "cache", "verify")
    assert r.returncode == 0, r.stderr
    assert f"checked {total} chunks" in r.stdout and "dropped 1 damaged" in r.stdout

    _flip_chunk(root, chunks[4])
    r = run_cli("--cache-dir", str(root), "cache", "verify", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "checked": total - 1,
        "dropped": [chunks[4].tag.hex()],
    }

    r = run_cli("--cache-dir", str(root), "cache", "verify", "--json")
    assert json.loads(r.stdout) == {"checked": total - 2, "dropped": []}
    with SiteCache(root) as c:
        assert c.get(chunks[2].tag) is None and c.get(chunks[4].tag) is None
        assert c.get(chunks[0].tag) == chunks[0].data


def _assert_one_error_line(r: subprocess.CompletedProcess[str], code: int) -> str:
    """One line on stderr; on stdout nothing, or with --json the same error as one JSON line."""
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("isrsync:"), lines[0]
    if "--json" in r.args:
        (doc,) = [json.loads(ln) for ln in r.stdout.splitlines()]
        assert doc["error"]["exit_code"] == code and doc["error"]["message"] in lines[0], doc
    else:
        assert r.stdout == ""
    return lines[0]


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize(
    "command", [["cache", "info"], ["cache", "info", "--json"], ["cache", "verify"]]
)
def test_cache_path_is_a_file(tmp_path, how, command):
    # A long path: the one line must not be wrapped into several.
    f = tmp_path / ("a-rather-long-directory-name-" * 4) / "not-a-directory"
    f.parent.mkdir()
    f.write_text("x")
    if how == "flag":
        r = run_cli("--cache-dir", str(f), *command)
    else:
        r = run_cli(*command, env={ENV_CACHE: str(f)})
    line = _assert_one_error_line(r, 10)
    assert str(f) in line and "not a directory" in line
    assert f.read_text() == "x"


def test_damaged_index_is_one_line(filled):
    root, *_ = filled
    for p in root.glob("index.db*"):
        p.unlink()
    (root / "index.db").write_bytes(b"this is not sqlite" * 300)
    line = _assert_one_error_line(
        run_cli("--cache-dir", str(root), "cache", "info"), 10
    )
    assert "index" in line


def test_debug_shows_traceback(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    r = run_cli("--debug", "--cache-dir", str(f), "cache", "info")
    assert r.returncode == 10
    assert "Traceback (most recent call last)" in r.stderr
    assert "CacheError" in r.stderr
    assert r.stderr.splitlines()[-1].startswith("isrsync:")
    r = run_cli("--cache-dir", str(f), "cache", "info", env={"ISRSYNC_DEBUG": "1"})
    assert r.returncode == 10
    assert "Traceback (most recent call last)" in r.stderr
