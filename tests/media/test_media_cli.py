"""`sneakernet format`, `index` and `ls`, in process through the real runner (one line per
error, its exit code, ``--json`` for scripts, errors included), and the site cache
directory resolved exactly as isrsync resolves it."""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest
from mediakit import make_chunks, make_manifest

from isrsync.errors import UsageError
from isrsync.site.cache import default_cache_dir as isrsync_cache_dir
from sneakernet import cli as sncli
from sneakernet import format as fmt
from sneakernet import known
from sneakernet.medium import format_medium, open_medium

ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch):
    """``run(*args) -> (code, stdout, stderr lines)`` with this test's own site cache."""
    monkeypatch.delenv(known.ENV_CACHE, raising=False)
    monkeypatch.delenv("ISRSYNC_DEBUG", raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    cache = tmp_path / "site-cache"

    def go(*args: str) -> tuple[int, str, list[str]]:
        code = sncli.run(["--cache-dir", str(cache), *args])
        cap = capsys.readouterr()
        return code, ANSI.sub("", cap.out), ANSI.sub("", cap.err).splitlines()

    go.cache = cache  # type: ignore[attr-defined]
    return go


def test_format_index_ls(run, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.mkdir()
    code, out, err = run("format", str(key), "--label", "bob")
    assert (code, err) == (0, []) and f"formatted {key} as medium" in out and "(bob)" in out
    mid = open_medium(key).medium_id

    p = uuid.uuid4()
    chunks = make_chunks(5)
    with open_medium(key).writer() as w:
        w.add_chunks(chunks.items())
        w.add_manifest(make_manifest(p, 1))
        w.publish()
    code, out, err = run("index", str(key))
    assert code == 0 and err == []
    assert f"indexed {key} (medium {mid} \"bob\"): 5 chunks" in out
    assert "read 0 of 1 files" in out, "the writer's pack is not read again"
    assert f"carries parcel {p} version 1" in out and f"index: {key / fmt.DIR / fmt.INDEX_FILE}" in out

    code, out, err = run("ls")
    assert code == 0 and str(mid)[:8] in out and "bob" in out and f"{str(p)[:8]} v1" in out and "just now" in out

    code, out, _ = run("ls", "--json")
    media = json.loads(out)
    assert len(media) == 1
    m = media[0]
    assert (m["medium_id"], m["label"], m["path"], m["chunks"], m["index_beside"]) == (str(mid), "bob", str(key), 5,
                                                                                         False)
    assert m["parcels"] == [{"parcel": str(p), "versions": [1]}] and m["capacity"] > 0 and m["last_seen"] > 0
    assert (run.cache / known.MEDIA_DIR / str(mid) / known.SEEN_FILE).is_file()  # type: ignore[attr-defined]


def test_ls_of_a_site_that_has_seen_nothing(run) -> None:
    code, out, _ = run("ls")
    assert code == 0 and "no media seen at this site yet" in out and "sneakernet index PATH" in out
    assert run("ls", "--json")[:2] == (0, "[]\n")


def test_a_plain_tree_is_indexed_beside_it_in_the_site_cache(run, tmp_path: Path) -> None:
    tree = tmp_path / "share"
    tree.mkdir()
    long_ago = 1_600_000_000 * 10**9  # outside the racy window: a re-index trusts size + mtime
    for i, d in enumerate(make_chunks(3).values()):
        (tree / f"c{i}").write_bytes(d)
        os.utime(tree / f"c{i}", ns=(long_ago, long_ago))
    code, out, _ = run("index", str(tree), "--json")
    assert code == 0
    doc = json.loads(out)
    beside = run.cache / known.MEDIA_DIR / doc["medium"]["key"]  # type: ignore[attr-defined]
    assert doc["index"]["chunks"] == 3 and doc["index"]["index_file"] == str(beside / fmt.INDEX_FILE)
    assert doc["medium"]["medium_id"] is None and doc["medium"]["index_beside"] is True
    assert not (tree / fmt.DIR).exists()
    again = json.loads(run("index", str(tree), "--json")[1])
    assert again["index"]["rehashed"] == 0 and again["index"]["hashed_bytes"] == 0


def test_a_read_only_medium_is_indexed_in_the_site_cache(run, tmp_path: Path, mounts) -> None:
    src = tmp_path / "src"
    src.mkdir()
    mid = format_medium(src, "dvd").medium_id
    (src / "one").write_bytes(next(iter(make_chunks(1).values())))
    ro = mounts.bind_readonly(src, tmp_path / "cdrom")
    code, out, _ = run("index", str(ro), "--json")
    doc = json.loads(out)
    assert code == 0 and doc["medium"]["key"] == str(mid) and doc["medium"]["index_beside"] is True
    assert Path(doc["index"]["index_file"]).parent == run.cache / known.MEDIA_DIR / str(mid)  # type: ignore[attr-defined]


def test_explicit_index_dir(run, tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.mkdir()
    format_medium(key)
    code, out, _ = run("index", str(key), "--index-dir", str(tmp_path / "elsewhere"), "--json")
    assert code == 0 and json.loads(out)["index"]["index_file"] == str(tmp_path / "elsewhere" / fmt.INDEX_FILE)


@pytest.mark.parametrize("args", [["format", "{missing}"], ["index", "{missing}"], ["format", "{key}"],
                                  ["format", "{new}", "--label", "a/b"]])
def test_errors_are_one_line_and_json_with_json(run, tmp_path: Path, args: list[str]) -> None:
    key = tmp_path / "key"
    key.mkdir()
    format_medium(key)
    (tmp_path / "new").mkdir()
    argv = [a.format(missing=tmp_path / "missing", key=key, new=tmp_path / "new") for a in args]
    code, out, err = run(*argv)
    assert code in (UsageError.exit_code, 3) and out == "" and len(err) == 1 and err[0].startswith("sneakernet: ")
    assert "Traceback" not in err[0]
    code2, out2, err2 = run(*argv, "--json")
    assert code2 == code and err2 == err
    e = json.loads(out2)["error"]
    assert e["exit_code"] == code and e["message"] in err[0] and e["type"] in ("UsageError", "FormatError")


def test_the_cache_directory_is_isrsyncs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from isrsync.site import cache as site_cache

    assert known.ENV_CACHE == site_cache.ENV_CACHE
    monkeypatch.delenv(known.ENV_CACHE, raising=False)
    assert known.default_cache_dir() == isrsync_cache_dir()
    monkeypatch.setenv(known.ENV_CACHE, str(tmp_path / "env"))
    assert known.default_cache_dir() == isrsync_cache_dir() == tmp_path / "env"
    assert known.default_cache_dir(tmp_path / "flag") == isrsync_cache_dir(tmp_path / "flag")


def test_the_cache_directory_comes_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(known.ENV_CACHE, str(tmp_path / "env-cache"))
    key = tmp_path / "key"
    key.mkdir()
    assert sncli.run(["format", str(key)]) == 0
    capsys.readouterr()
    assert len(known.known_media(tmp_path / "env-cache")) == 1


def test_a_cache_that_cannot_be_written_only_warns(run, tmp_path: Path) -> None:
    run.cache.parent.mkdir(exist_ok=True)  # type: ignore[attr-defined]
    run.cache.write_bytes(b"not a directory")  # type: ignore[attr-defined]
    key = tmp_path / "key"
    key.mkdir()
    code, out, err = run("format", str(key))
    assert code == 0 and "formatted" in out
    assert len(err) == 1 and err[0].startswith("sneakernet: warning: cannot record the medium")
    assert os.path.isdir(key / fmt.DIR)


def test_index_and_remember_is_what_a_watcher_calls(tmp_path: Path, mounts) -> None:
    cache = tmp_path / "cache"
    key = tmp_path / "key"
    key.mkdir()
    format_medium(key, "w")
    on = known.index_and_remember(key, cache)
    assert on.index_dir is None and on.record_error is None and on.medium.label == "w"
    assert on.report.index_file == key / fmt.DIR / fmt.INDEX_FILE
    ro = mounts.bind_readonly(key, tmp_path / "ro")
    beside = known.index_and_remember(ro, cache)
    assert beside.index_dir == known.media_dir(cache, on.medium.key) and beside.medium.index_beside
    assert [m.path for m in known.known_media(cache)] == [str(ro)], "one record per medium, where it was last seen"
