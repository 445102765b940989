"""`isrsync server add-user / list-users / remove-user` against a data directory
that a real `isrsync serve` is using at the same time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from isrsync.server.schema import hash_token

from srvkit import assert_json_error, bearer, call


def _cmd() -> list[str]:
    exe = Path(sys.executable).with_name("isrsync")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "isrsync.cli.main"]


def cli(*args: str, data: Path | None = None) -> subprocess.CompletedProcess:
    extra = ["--data", str(data)] if data is not None else []
    env = {k: v for k, v in os.environ.items() if k != "ISRSYNC_SERVER_DATA"}
    return subprocess.run([*_cmd(), "server", *args, *extra], capture_output=True, text=True, timeout=60,
                          env={**env, "COLUMNS": "200"})


def token_of(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    assert len(lines) == 2 and "created" in lines[0], r.stdout
    return lines[1].strip()


def _all_bytes(data: Path) -> dict[str, bytes]:
    return {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file()}


def test_add_user_prints_a_token_stored_only_hashed(live_server) -> None:
    data = live_server.data
    r = cli("add-user", "carol", data=data)
    token = token_of(r)
    assert len(token) >= 40 and " " not in token
    rj = cli("add-user", "dave", "--json", data=data)
    assert rj.returncode == 0, rj.stderr
    doc = json.loads(rj.stdout)
    assert doc["user"] == "dave" and isinstance(doc["token"], str) and len(doc["token"]) >= 40
    assert doc["token"] != token
    # The server (a separate process on the same directory) accepts both at once.
    for name, tok in (("carol", token), ("dave", doc["token"])):
        a = call(live_server.port, "GET", "/v1/parcels", headers=bearer(tok))
        assert a.status == 200 and a.json() == [], (name, a)
    # Only a hash is kept: no file of the data directory holds a token (db, -wal, -shm, logs).
    files = _all_bytes(data)
    assert any(n.startswith("store.db") for n in files)
    for tok in (token, doc["token"]):
        for name, raw in files.items():
            assert tok.encode() not in raw, f"token in clear in {name}"
    # ...while its hash is there (so the search looked where the users live).
    assert any(hash_token(token) in raw for raw in files.values())
    log = live_server.log.read_text()
    assert token not in log and doc["token"] not in log


def test_list_users(live_server) -> None:
    data = live_server.data
    tok = token_of(cli("add-user", "erin", data=data))
    token_of(cli("add-user", "frank", data=data))
    pid = uuid.uuid4()
    assert call(live_server.port, "POST", "/v1/parcels", json.dumps({"parcel": str(pid), "name": "vm"}).encode(),
                bearer(tok)).status == 201
    r = cli("list-users", "--json", data=data)
    assert r.returncode == 0, r.stderr
    rows = {u["user"]: u for u in json.loads(r.stdout)}
    assert set(rows) == {"erin", "frank"}
    assert rows["erin"]["parcels"] == 1 and rows["frank"]["parcels"] == 0
    assert all(isinstance(u["created"], (int, float)) and u["created"] > 0 for u in rows.values())
    r = cli("list-users", data=data)
    assert r.returncode == 0 and "erin" in r.stdout and "frank" in r.stdout, r.stdout
    assert tok not in r.stdout


def test_removed_user_is_refused_by_the_running_server(live_server) -> None:
    data = live_server.data
    tok = token_of(cli("add-user", "gina", data=data))
    keep = token_of(cli("add-user", "hank", data=data))
    pid = uuid.uuid4()
    assert call(live_server.port, "POST", "/v1/parcels", json.dumps({"parcel": str(pid), "name": "vm"}).encode(),
                bearer(tok)).status == 201
    assert call(live_server.port, "GET", f"/v1/parcels/{pid}", headers=bearer(tok)).status == 200
    r = cli("remove-user", "gina", data=data)
    assert r.returncode == 0 and "gina" in r.stdout, r.stderr
    for path in ("/v1/parcels", f"/v1/parcels/{pid}", f"/v1/parcels/{pid}/lock"):
        body = assert_json_error(call(live_server.port, "GET", path, headers=bearer(tok)), 401)
        assert body["kind"] == "AuthError"
    assert call(live_server.port, "GET", "/v1/parcels", headers=bearer(keep)).status == 200
    users = {u["user"] for u in json.loads(cli("list-users", "--json", data=data).stdout)}
    assert users == {"hank"}
    # Re-adding the name gives a new token; the old one stays dead, and the old parcels are gone.
    tok2 = token_of(cli("add-user", "gina", data=data))
    assert tok2 != tok
    assert call(live_server.port, "GET", "/v1/parcels", headers=bearer(tok)).status == 401
    a = call(live_server.port, "GET", "/v1/parcels", headers=bearer(tok2))
    assert a.status == 200 and a.json() == []


def test_duplicate_add_user_is_a_clear_error(live_server) -> None:
    data = live_server.data
    tok = token_of(cli("add-user", "ivan", data=data))
    r = cli("add-user", "ivan", data=data)
    assert r.returncode == 7, (r.returncode, r.stderr)  # Conflict
    assert r.stdout.strip() == ""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("isrsync: ") and "ivan already exists" in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    # The first token still works: the refused add changed nothing.
    assert call(live_server.port, "GET", "/v1/parcels", headers=bearer(tok)).status == 200
    rows = json.loads(cli("list-users", "--json", data=data).stdout)
    assert [u["user"] for u in rows] == ["ivan"]


def test_remove_unknown_user_is_a_clear_error(tmp_path: Path) -> None:
    token_of(cli("add-user", "somebody", data=tmp_path / "d"))
    r = cli("remove-user", "nobody", data=tmp_path / "d")
    assert r.returncode == 5, (r.returncode, r.stderr)  # NotFound
    assert "isrsync: no user nobody" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("name", [
    "Alice", "1abc", "a" * 65, "bad/name", "../x", "..", "a b", "é", "user;rm", "x\ty", "we$ird",
])
def test_invalid_user_names_are_rejected(tmp_path: Path, name: str) -> None:
    data = tmp_path / "d"
    r = cli("add-user", name, data=data)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout.strip() == "", "no token may be printed for a refused name"
    assert "is not a valid user name" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # The name is refused before the data directory is made: nothing was created
    # (a name is never a path, and a refused add-user leaves no empty home behind).
    assert list(tmp_path.iterdir()) == []
    # ...and in an existing home the refused name adds no user and no file.
    token_of(cli("add-user", "ok", data=data))
    r = cli("add-user", name, data=data)
    assert r.returncode == 2 and "is not a valid user name" in r.stderr, r.stderr
    assert [u["user"] for u in json.loads(cli("list-users", "--json", data=data).stdout)] == ["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert not any(p.name not in ("store.db", "store.db-wal", "store.db-shm", "packs", "uploads")
                   for p in data.iterdir())


def test_user_name_with_a_trailing_newline_is_rejected(tmp_path: Path) -> None:
    r"""BUG: repo.USER_RE is checked with re.match and ends in ``$``, which also matches
    just before a final newline: "eve\n" is accepted as a user name (and becomes an
    uploads/ directory name with a newline in it). PARCEL_NAME_RE has the same flaw.
    Fix (isrsync/server/repo.py): use ``\Z`` instead of ``$``, or ``fullmatch``.
    """
    data = tmp_path / "d"
    r = cli("add-user", "eve\n", data=data)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "is not a valid user name" in r.stderr
    assert not data.exists()


@pytest.mark.parametrize("name", ["_svc", "a", "a" * 64, "web-1.prod_x"])
def test_valid_odd_user_names_work_end_to_end(live_server, name: str) -> None:
    tok = token_of(cli("add-user", name, data=live_server.data))
    pid = uuid.uuid4()
    assert call(live_server.port, "POST", "/v1/parcels", json.dumps({"parcel": str(pid), "name": "vm"}).encode(),
                bearer(tok)).status == 201
    assert call(live_server.port, "GET", f"/v1/parcels/{pid}/uploads/{'ab' * 32}", headers=bearer(tok)).status == 200
    assert (live_server.data / "uploads" / name).is_dir()


# --------------------------------------------------------------------------
# A path that holds no data directory is refused, not made into an empty home
# --------------------------------------------------------------------------


def _one_line(r: subprocess.CompletedProcess) -> str:
    """One line on stderr; on stdout nothing, or with --json the same error as one JSON line."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    if "--json" in r.args:
        (doc,) = [json.loads(ln) for ln in r.stdout.splitlines()]
        assert doc["error"]["exit_code"] == r.returncode and doc["error"]["message"] in lines[0], doc
    else:
        assert r.stdout.strip() == "", r.stdout
    return lines[0]


@pytest.mark.parametrize("args", [
    ["list-users"], ["list-users", "--json"], ["remove-user", "alice"], ["check"], ["check", "--quick"],
    ["prune", "alice", "vm", "--keep", "1"],
])
def test_admin_commands_refuse_a_path_with_no_data(tmp_path: Path, args: list[str]) -> None:
    typo = tmp_path / "TYPO"
    r = cli(*args, data=typo)
    assert r.returncode == 5, (r.returncode, r.stderr)  # NotFound
    line = _one_line(r)
    assert line.startswith(f"isrsync: {typo} holds no isrsync server data"), line
    assert f"isrsync server add-user NAME --data {typo}" in line, line
    assert not typo.exists()
    assert list(tmp_path.iterdir()) == []


def test_admin_commands_refuse_an_empty_directory_and_leave_it_empty(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("list-users", data=empty)
    assert r.returncode == 5 and "holds no isrsync server data" in _one_line(r)
    assert list(empty.iterdir()) == []


def test_add_user_creates_the_data_directory(tmp_path: Path) -> None:
    data = tmp_path / "new" / "home"
    token_of(cli("add-user", "alice", data=data))
    assert (data / "store.db").is_file()
    assert [u["user"] for u in json.loads(cli("list-users", "--json", data=data).stdout)] == ["alice"]


def test_serve_creates_a_fresh_data_directory(live_server) -> None:
    # live_server runs `isrsync serve --data DIR` on a directory that did not exist.
    assert (live_server.data / "store.db").is_file()
    r = cli("list-users", data=live_server.data)
    assert r.returncode == 0, r.stderr
    assert "no users yet; add one with `isrsync server add-user NAME`" in r.stdout
    assert json.loads(cli("list-users", "--json", data=live_server.data).stdout) == []


def test_login_to_a_file_home_that_does_not_exist(tmp_path: Path) -> None:
    """`isrsync login file:///TYPO` refuses, saying how to make a home; nothing is created."""
    typo = tmp_path / "TYPO"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ISRSYNC_")}
    env.update(HOME=str(tmp_path / "h"), ISRSYNC_CONFIG=str(tmp_path / "h" / "config.json"),
               ISRSYNC_RUNTIME=str(tmp_path / "h" / "rt"), ISRSYNC_PASSPHRASE="pw", COLUMNS="200")
    (tmp_path / "h").mkdir()
    r = subprocess.run([*_cmd(), "login", f"file://{typo}", "--user", "alice", "--kdf-min"],
                       capture_output=True, text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 5, (r.returncode, r.stderr)
    line = _one_line(r)
    assert line == (f"isrsync: {typo} holds no isrsync server data; check the path, or create it with "
                    f"`isrsync server add-user NAME --data {typo}`"), line
    assert not typo.exists()
    assert not (tmp_path / "h" / "config.json").exists(), "a refused login must not be recorded"
    # Once the home exists, the same login works (and adds the user).
    token_of(cli("add-user", "bob", data=typo))
    r = subprocess.run([*_cmd(), "login", f"file://{typo}", "--user", "alice", "--kdf-min"],
                       capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert [u["user"] for u in json.loads(cli("list-users", "--json", data=typo).stdout)] == ["alice", "bob"]
