"""Hostile and broken requests against a real `isrsync serve`.

Every bad request must get a 4xx with a JSON ``{"error": ...}`` that says what
was wrong, must change nothing, and must leave the server answering
``/v1/health``. The fuzz test at the end sends thousands of malformed requests
built from the real routes and checks that none gets a 5xx and that the data
directory (SQLite rows and pack files) is byte-for-byte what it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import re
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from isrsync.chunk import tag_of
from isrsync.pack import _ENTRY, _FOOTER, _HEADER, END_MAGIC, MAGIC
from isrsync.store import wire
from isrsync.store.base import Holder
from isrsync.store.http import HttpStore

from srvkit import (
    API, Answer, Chain, access_log, araw, assert_json_error, bearer, call, db_snapshot, files_snapshot, files_under, healthy, raw_answer, server_exceptions,
)


@dataclass
class Env:
    srv: object
    alice: str
    bob: str
    pid: uuid.UUID  # alice's parcel "p1": version 1 committed, lock free (epoch 1)
    bob_pid: uuid.UUID
    chain: Chain
    pack_id: bytes  # the pack of version 1 (live)
    pack_path: Path
    commit_v1: bytes  # the wire body of version 1's commit (a replay changes nothing)
    commit_v2: bytes  # a well-formed commit of version 2 with epoch 1 (the lock is free: refused)

    @property
    def port(self) -> int:
        return self.srv.port  # type: ignore[attr-defined]

    @property
    def data(self) -> Path:
        return self.srv.data  # type: ignore[attr-defined]

    @property
    def p(self) -> str:
        return f"{API}/parcels/{self.pid}"


def build_env(srv, work: Path) -> Env:
    alice, bob = srv.add_user("alice"), srv.add_user("bob")
    pid, bob_pid = uuid.uuid4(), uuid.uuid4()
    chain = Chain(pid, disk_chunks=64)

    async def setup() -> tuple:
        a, b = HttpStore(srv.url, alice), HttpStore(srv.url, bob)
        try:
            await a.create_parcel(pid, "p1", "x86_64-kvm")
            await b.create_parcel(bob_pid, "bobs")
            await a.put_key_bundle(b"sealed-bundle-bytes", None)
            await b.put_key_bundle(b"bobs-sealed-bundle", None)
            ch = chain.make_change(work / "v1", 3)
            await a.put_pack(pid, ch.pack_id, ch.pack_path)
            lock = await a.acquire(pid, Holder("site-a", "host-a"))
            req1, _ = chain.request(ch, lock.epoch, release=True, site="site-a")
            await a.commit(pid, req1)
            chain.landed(req1.manifest)
            ch2 = chain.make_change(work / "v2", 2)
            req2, _ = chain.request(ch2, lock.epoch, release=True, site="site-a")
            return ch, wire.encode_commit(req1), wire.encode_commit(req2), ch2
        finally:
            await a.close()
            await b.close()

    ch, c1, c2, _ = asyncio.run(setup())
    return Env(srv, alice, bob, pid, bob_pid, chain, ch.pack_id, ch.pack_path, c1, c2)


@pytest.fixture(scope="module")
def env(tmp_path_factory, live_server_cls) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("bad-input")
    srv = live_server_cls(work / "data").start()
    try:
        yield build_env(srv, work)
    finally:
        srv.kill()


@pytest.fixture(autouse=True)
def still_serving(request) -> Iterator[None]:
    yield
    if "env" in request.fixturenames:
        e: Env = request.getfixturevalue("env")
        assert e.srv.proc.poll() is None, "the server died"
        assert healthy(e.port), "the server no longer answers /v1/health"


def packs_rows(e: Env) -> set[bytes]:
    return {r[0] for r in db_snapshot(e.data)["packs"]}


def leftover_uploads(e: Env) -> list[str]:
    return [f for f in files_under(e.data / "uploads") if not f.endswith(".tmp")]


# -- authentication -------------------------------------------------------------------


BAD_AUTH = {
    "missing": None,
    "wrong-token": "Bearer " + "A" * 43,
    "empty-bearer": "Bearer ",
    "no-space": "Bearer",
    "basic": "Basic YWxpY2U6c2VjcmV0",
    "lowercase-scheme": "bearer {token}",
    "token-scheme": "Token {token}",
    "double-token": "Bearer {token} {token}",
    "too-long": "Bearer " + "x" * 700,
    "token-prefix": "Bearer {short}",
}


@pytest.mark.parametrize("how", list(BAD_AUTH))
@pytest.mark.parametrize("route", [
    ("GET", "/v1/parcels"), ("POST", "{p}/lock"), ("PUT", "{p}/packs/{pack}"),
    ("GET", "/v1/keybundle"), ("POST", "{p}/commit"),
])
def test_bad_credentials_are_401(env: Env, how: str, route: tuple[str, str]) -> None:
    method, path = route
    path = path.format(p=env.p, pack=os.urandom(32).hex())
    value = BAD_AUTH[how]
    headers = {}
    if value is not None:
        headers["Authorization"] = value.format(token=env.alice, short=env.alice[:-1])
    before = db_snapshot(env.data)
    a = call(env.port, method, path, b'{"site": "s", "host": "h"}', headers)
    body = assert_json_error(a, 401)
    assert body["kind"] == "AuthError"
    assert db_snapshot(env.data) == before


def test_health_needs_no_token_and_tokens_do_not_leak_between_users(env: Env) -> None:
    a = call(env.port, "GET", f"{API}/health")
    assert a.status == 200 and a.json()["ok"] is True
    # bob's token opens bob's parcel and not alice's; the refusal is a plain "no such parcel".
    mine = call(env.port, "GET", f"{API}/parcels/{env.bob_pid}", headers=bearer(env.bob))
    assert mine.status == 200 and mine.json()["name"] == "bobs"
    other = call(env.port, "GET", env.p, headers=bearer(env.bob))
    absent = call(env.port, "GET", f"{API}/parcels/{uuid.uuid4()}", headers=bearer(env.bob))
    assert assert_json_error(other, 404)["kind"] == assert_json_error(absent, 404)["kind"] == "NotFound"


def test_non_utf8_bytes_in_authorization_are_401(env: Env) -> None:
    """BUG: a token with bytes that are not UTF-8 crashes authentication (HTTP 500).

    aiohttp decodes header values with ``surrogateescape``; repo.hash_token calls
    ``token.encode()`` which raises UnicodeEncodeError (not an IsrError) in the
    auth middleware.
    """
    a = raw_answer(
        env.port,
        b"GET /v1/parcels HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\xc3(\r\nConnection: close\r\n\r\n",
    )
    assert a is not None
    assert_json_error(a, 401)


# -- routes and methods ------------------------------------------------------------------


@pytest.mark.parametrize("method,path,status", [
    ("GET", "/v1/nope", 404),
    ("GET", "/v2/health", 404),
    ("GET", "/", 404),
    ("GET", "{p}/lock/steal", 404),
    ("GET", "{p}/packs", 404),
    ("POST", "/v1/parcels/{pid}/versions", 405),
    ("DELETE", "{p}", 405),
    ("PATCH", "{p}/lock", 405),
    ("PUT", "{p}/commit", 405),
    ("GET", "{p}/commit", 405),
    ("DELETE", "/v1/keybundle", 405),
    ("DELETE", "{p}/packs/{pack}", 405),
    ("PATCH", "{p}/packs/{pack}", 405),
    ("GET", "{p}/lock/release", 405),
])
def test_unknown_routes_and_wrong_methods(env: Env, method: str, path: str, status: int) -> None:
    path = path.format(p=env.p, pid=env.pid, pack=env.pack_id.hex())
    before = db_snapshot(env.data)
    a = call(env.port, method, path, b"{}", bearer(env.alice))
    assert_json_error(a, status)
    assert db_snapshot(env.data) == before


def test_post_to_health_is_405_json(env: Env) -> None:
    assert_json_error(call(env.port, "POST", f"{API}/health", b"{}"), 405)


# -- JSON bodies ---------------------------------------------------------------------------


JSON_ROUTES = ["/v1/parcels", "{p}/lock", "{p}/lock/release", "{p}/lock/break", "{p}/lock/hand-over",
               "{p}/have-packs", "{p}/locate"]
MALFORMED = {
    "empty": b"",
    "open-brace": b"{",
    "trailing-comma": b'{"a": 1,}',
    "not-utf8": b"\xff\xfe\x00{",
    "nan-bare": b"{\"epoch\": NaN",
    "single-quotes": b"{'site': 's'}",
    "null": b"null",
    "array": b"[]",
    "string": b'"site"',
    "number": b"12",
    "true": b"true",
    "truncated": b'{"site": "s", "host": "h',
}


@pytest.mark.parametrize("body", list(MALFORMED))
@pytest.mark.parametrize("route", JSON_ROUTES)
def test_malformed_json_is_400(env: Env, route: str, body: str) -> None:
    before = db_snapshot(env.data)
    a = call(env.port, "POST", route.format(p=env.p), MALFORMED[body],
             {**bearer(env.alice), "Content-Type": "application/json"})
    err = assert_json_error(a, 400)
    assert err["kind"] == "FormatError", err
    assert db_snapshot(env.data) == before


WRONG_TYPES = [
    ("/v1/parcels", {"parcel": 5, "name": "x"}, "parcel"),
    ("/v1/parcels", {"parcel": "not-a-uuid", "name": "x"}, "parcel id"),
    ("/v1/parcels", {"parcel": str(uuid.UUID(int=7)), "name": 7}, "name"),
    ("/v1/parcels", {"parcel": str(uuid.UUID(int=7)), "name": "ok", "hardware": ["x"]}, "hardware"),
    ("/v1/parcels", {"parcel": str(uuid.UUID(int=7))}, "name"),
    ("{p}/lock", {"site": 1, "host": "h"}, "site"),
    ("{p}/lock", {"site": "s", "host": None}, "host"),
    ("{p}/lock", {"site": "s"}, "host"),
    ("{p}/lock", {"site": ["s"], "host": "h"}, "site"),
    ("{p}/lock/release", {"epoch": "1"}, "epoch"),
    ("{p}/lock/release", {"epoch": True}, "epoch"),
    ("{p}/lock/release", {"epoch": 1.0}, "epoch"),
    ("{p}/lock/release", {"epoch": None}, "epoch"),
    ("{p}/lock/release", {}, "epoch"),
    ("{p}/lock/break", {"reason": 5}, "reason"),
    ("{p}/lock/break", {"reason": {"why": "x"}}, "reason"),
    ("{p}/lock/hand-over", {"site": "medium:x", "host": "KEY"}, "epoch"),
    ("{p}/lock/hand-over", {"epoch": "1", "site": "medium:x", "host": "KEY"}, "epoch"),
    ("{p}/lock/hand-over", {"epoch": True, "site": "medium:x", "host": "KEY"}, "epoch"),
    ("{p}/lock/hand-over", {"epoch": 1.0, "site": "medium:x", "host": "KEY"}, "epoch"),
    ("{p}/lock/hand-over", {"epoch": -1, "site": "medium:x", "host": "KEY"}, "epoch"),
    ("{p}/lock/hand-over", {"epoch": 10**30, "site": "medium:x", "host": "KEY"}, "epoch"),
    ("{p}/lock/hand-over", {"epoch": 1, "host": "KEY"}, "site"),
    ("{p}/lock/hand-over", {"epoch": 1, "site": None, "host": "KEY"}, "site"),
    ("{p}/lock/hand-over", {"epoch": 1, "site": ["medium:x"], "host": "KEY"}, "site"),
    ("{p}/lock/hand-over", {"epoch": 1, "site": "medium:x"}, "host"),
    ("{p}/lock/hand-over", {"epoch": 1, "site": "medium:x", "host": 7}, "host"),
    ("{p}/have-packs", {"packs": "abc"}, "packs"),
    ("{p}/have-packs", {"packs": [1, 2]}, "pack id"),
    ("{p}/have-packs", {"packs": ["zz" * 32]}, "pack id"),
    ("{p}/have-packs", {"packs": ["ab" * 31]}, "pack id"),
    ("{p}/have-packs", {}, "packs"),
    ("{p}/locate", {"tags": {"a": 1}}, "tag"),
    ("{p}/locate", {"tags": ["g" * 64]}, "tag"),
    ("{p}/locate", {"tags": [None]}, "tag"),
]


@pytest.mark.parametrize("route,body,mentions", WRONG_TYPES, ids=[f"{r}-{m}-{i}" for i, (r, _, m) in enumerate(WRONG_TYPES)])
def test_json_of_wrong_types_is_400_and_names_the_field(env: Env, route: str, body: dict, mentions: str) -> None:
    before = db_snapshot(env.data)
    a = call(env.port, "POST", route.format(p=env.p), json.dumps(body).encode(), bearer(env.alice))
    err = assert_json_error(a, 400)
    assert mentions in err["error"], err
    assert db_snapshot(env.data) == before


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_deeply_nested_json_is_400(env: Env, route: str) -> None:
    """BUG: json.loads raises RecursionError (not ValueError) on deep nesting -> HTTP 500.

    app._body_json catches only (ValueError, UnicodeDecodeError).
    """
    body = b"[" * 100_000 + b"]" * 100_000
    a = call(env.port, "POST", route.format(p=env.p), body, bearer(env.alice))
    assert_json_error(a, 400)


def test_deeply_nested_commit_meta_is_400(env: Env) -> None:
    """BUG: wire.decode_commit lets RecursionError through (HTTP 500)."""
    meta = b"[" * 100_000 + b"]" * 100_000
    a = call(env.port, "POST", f"{env.p}/commit", struct.pack("<I", len(meta)) + meta, bearer(env.alice))
    assert_json_error(a, 400)


@pytest.mark.parametrize("route,body", [
    ("{q}/lock", {"site": "\ud800", "host": "h"}),
    ("{q}/lock", {"site": "s", "host": "\udfff\ud800"}),
    ("{q}/lock/break", {"reason": "lost \udc80"}),
    ("{q}/lock/hand-over", {"epoch": 0, "site": "medium:\ud800", "host": "KEY"}),
    ("{q}/lock/hand-over", {"epoch": 0, "site": "medium:x", "host": "KEY\udfff"}),
    ("/v1/parcels", {"parcel": "{new}", "name": "surrogate", "hardware": "\ud83d"}),
])
def test_lone_surrogates_in_json_strings_are_not_500(env: Env, route: str, body: dict) -> None:
    """BUG: a JSON string with a lone surrogate ("\\ud800", valid JSON) reaches SQLite,
    which raises UnicodeEncodeError -> HTTP 500. Should be a 400 (or be stored escaped).

    Uses a parcel of its own, so a server that accepts the request changes nothing
    the other tests look at.
    """
    q = uuid.uuid4()
    name = f"sur-{q.hex[:8]}"
    assert call(env.port, "POST", "/v1/parcels", json.dumps({"parcel": str(q), "name": name}).encode(),
                bearer(env.alice)).status == 201
    raw_body = json.dumps(body).replace("{new}", str(uuid.uuid4())).encode()
    a = call(env.port, "POST", route.format(q=f"{API}/parcels/{q}"), raw_body, bearer(env.alice))
    assert a.status < 500, a
    if a.status >= 400:
        assert_json_error(a)


@pytest.mark.parametrize("name", ["vm\n", "vm\r\n", "", "-vm", ".hidden", "v/m", "v m", "a" * 129, "vm\x00"])
def test_invalid_parcel_names_are_400(env: Env, name: str) -> None:
    r"""("vm\n" is a BUG: PARCEL_NAME_RE ends in ``$``, which matches before a final
    newline, so a parcel name with a trailing newline is accepted; use ``\Z`` or
    fullmatch in isrsync/server/repo.py.)"""
    before = db_snapshot(env.data)
    a = call(env.port, "POST", "/v1/parcels", json.dumps({"parcel": str(uuid.uuid4()), "name": name}).encode(),
             bearer(env.alice))
    err = assert_json_error(a, 400)
    assert "not a valid parcel name" in err["error"], err
    assert db_snapshot(env.data) == before


# -- body limits ---------------------------------------------------------------------------


def _declared(env: Env, method: str, path: str, length: int, extra: str = "") -> Answer | None:
    """Announce a body of ``length`` bytes but send only a little: the limit must be
    enforced on the announced length, before reading."""
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.alice}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()
    return raw_answer(env.port, head + b"x" * 100)


@pytest.mark.parametrize("method,path,limit", [
    ("POST", "/v1/parcels", wire.MAX_JSON),
    ("POST", "{p}/lock", wire.MAX_JSON),
    ("POST", "{p}/lock/break", wire.MAX_JSON),
    ("POST", "{p}/lock/hand-over", wire.MAX_JSON),
    ("POST", "{p}/have-packs", wire.MAX_JSON),
    ("POST", "{p}/locate", 64 << 20),
    ("PUT", "/v1/keybundle", wire.MAX_BUNDLE),
    ("POST", "{p}/commit", wire.MAX_COMMIT),
    ("PUT", "{p}/packs/{fresh}", wire.MAX_PACK),
])
def test_declared_oversized_bodies_are_refused_up_front(env: Env, method: str, path: str, limit: int) -> None:
    before = db_snapshot(env.data)
    path = path.format(p=env.p, fresh=os.urandom(32).hex())
    a = _declared(env, method, path, limit + 1)
    assert a is not None, "no answer"
    err = assert_json_error(a, 400, 413)
    assert str(limit) in err["error"] or "out of range" in err["error"], err
    assert db_snapshot(env.data) == before
    assert leftover_uploads(env) == []


@pytest.mark.parametrize("path,limit", [
    ("/v1/parcels", wire.MAX_JSON), ("{p}/lock", wire.MAX_JSON), ("/v1/keybundle", wire.MAX_BUNDLE),
])
def test_chunked_bodies_over_the_limit_are_refused(env: Env, path: str, limit: int) -> None:
    """No Content-Length: the limit is enforced while reading."""
    method = "PUT" if "keybundle" in path else "POST"
    piece = b"y" * 65536
    n = limit // len(piece) + 2
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(n)) + b"0\r\n\r\n"
    head = (
        f"{method} {path.format(p=env.p)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.alice}\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    before = db_snapshot(env.data)
    a = raw_answer(env.port, head + body, timeout=30)
    assert a is not None
    err = assert_json_error(a, 400, 413)
    assert "exceeds" in err["error"], err
    assert db_snapshot(env.data) == before


def test_full_size_bodies_over_the_limit_are_refused(env: Env) -> None:
    """Really sending the bytes (not just announcing them) gets the same refusal."""
    a = call(env.port, "POST", "/v1/parcels", b" " * (wire.MAX_JSON + 1), bearer(env.alice))
    assert_json_error(a, 400, 413)
    a = call(env.port, "PUT", "/v1/keybundle", os.urandom(wire.MAX_BUNDLE + 1), bearer(env.alice))
    assert_json_error(a, 400, 413)
    got = call(env.port, "GET", "/v1/keybundle", headers=bearer(env.alice))
    assert got.status == 200 and got.body == b"sealed-bundle-bytes"


def test_key_bundle_compare_and_set(env: Env) -> None:
    a = call(env.port, "PUT", "/v1/keybundle", b"other", bearer(env.alice))  # no If-Match: "none yet"
    assert assert_json_error(a, 409)["kind"] == "Conflict"
    a = call(env.port, "PUT", "/v1/keybundle", b"other", {**bearer(env.alice), "If-Match": "ab" * 32})
    assert_json_error(a, 409)
    a = call(env.port, "PUT", "/v1/keybundle", b"other", {**bearer(env.alice), "If-Match": "not-hex"})
    assert_json_error(a, 400)
    a = call(env.port, "PUT", "/v1/keybundle", b"", bearer(env.alice))
    assert_json_error(a, 400)
    assert call(env.port, "GET", "/v1/keybundle", headers=bearer(env.alice)).body == b"sealed-bundle-bytes"
    assert call(env.port, "GET", "/v1/keybundle", headers=bearer(env.bob)).body == b"bobs-sealed-bundle"


# -- names in paths ---------------------------------------------------------------------------


ODD_PARCELS = [
    "..%2F..%2Fetc%2Fpasswd", "..%2F..%2Fstore.db", "%2e%2e", "..%5C..%5Cstore.db", "a" * 5000,
    "%C3%A9t%C3%A9", "%F0%9F%92%A5", "%00", "%ff%fe", "p1%00", str(uuid.UUID(int=1)), "{" + str(uuid.UUID(int=1)) + "}",
]


@pytest.mark.parametrize("parcel", ODD_PARCELS, ids=range(len(ODD_PARCELS)))
@pytest.mark.parametrize("sub", ["", "/versions", "/lock", "/manifests?first=1&last=1", "/uploads/" + "ab" * 32])
def test_odd_parcel_references_are_404_or_400(env: Env, parcel: str, sub: str) -> None:
    a = call(env.port, "GET", f"{API}/parcels/{parcel}{sub}", headers=bearer(env.alice))
    assert_json_error(a, 400, 404)


ODD_PACKS = [
    "..%2F..%2Fetc%2Fpasswd", "..%2F..%2F..%2Fstore.db", "ab" * 31, "ab" * 33, "AB" * 31 + "zz",
    "g" * 64, "%C3%A9" * 32, "%F0%9F%92%A5" * 16, "a" * 5000, "0x" + "ab" * 31, "-1", "%00" * 64,
    ".." + "ab" * 31,
]


@pytest.mark.parametrize("pack", ODD_PACKS, ids=range(len(ODD_PACKS)))
@pytest.mark.parametrize("method,kind", [("GET", "uploads"), ("GET", "packs"), ("PUT", "packs")])
def test_odd_pack_names_are_400(env: Env, pack: str, method: str, kind: str) -> None:
    before_db = db_snapshot(env.data)
    before_files = files_snapshot(env.data)
    body = b"ISRPACK\x00" + os.urandom(200) if method == "PUT" else None
    a = call(env.port, method, f"{env.p}/{kind}/{pack}", body, bearer(env.alice))
    err = assert_json_error(a, 400, 404)
    if a.status == 400:
        assert "pack id" in err["error"], err
    assert db_snapshot(env.data) == before_db
    assert files_snapshot(env.data) == before_files or _only_wal_changed(before_files, files_snapshot(env.data))


def _only_wal_changed(a: dict, b: dict) -> bool:
    keys = set(a) | set(b)
    return all(a.get(k) == b.get(k) for k in keys if not k.startswith("store.db"))


def test_raw_dotdot_paths_do_not_escape(env: Env) -> None:
    """Un-encoded ../ in the request target (http.client sends it verbatim)."""
    for path in [f"{env.p}/packs/../../../../etc/passwd", "/v1/parcels/../../x", "/../../store.db",
                 f"{env.p}/uploads/../../../store.db"]:
        a = call(env.port, "GET", path, headers=bearer(env.alice))
        assert_json_error(a)
        assert b"SQLite format" not in a.body and b"root:" not in a.body


@pytest.mark.parametrize("pack", ["%20" * 64, "%20" * 2 + "ab" * 31, "ab" * 16 + "%20%20" + "ab" * 15],
                         ids=["all-spaces", "leading-spaces", "inner-spaces"])
def test_pack_ids_with_whitespace_are_400(env: Env, pack: str) -> None:
    """BUG: wire.hexid checks the length and then bytes.fromhex, which skips ASCII
    whitespace: a 64-character id made of spaces is accepted as b"" (or a shorter
    id), instead of "pack id must be 64 hex digits" (isrsync/store/wire.py, hexid).
    """
    a = call(env.port, "GET", f"{env.p}/uploads/{pack}", headers=bearer(env.alice))
    assert_json_error(a, 400)
    a = call(env.port, "POST", f"{env.p}/have-packs",
             json.dumps({"packs": [pack.replace("%20", " ")]}).encode(), bearer(env.alice))
    assert_json_error(a, 400)


# -- uploads: lengths and ranges ------------------------------------------------------------


@pytest.mark.parametrize("content_range,body_len,status", [
    ("bytes=0-9/10", 10, 400),
    ("bytes 0-9", 10, 400),
    ("bytes a-b/c", 10, 400),
    ("bytes -1-9/10", 10, 400),
    ("bytes 0-9/10 ", 10, 400),
    ("items 0-9/10", 10, 400),
    ("bytes 5-4/10", 2, 400),  # end before start
    ("bytes 0-10/10", 11, 400),  # end past total
    ("bytes 0-9/10", 5, 400),  # range longer than the body
    ("bytes 0-4/10", 10, 400),  # body longer than the range
    ("bytes 0-0/0", 1, 400),
    ("bytes 5-9/10", 5, 409),  # not where the server is (offset 0)
    ("bytes 0-9/" + str(wire.MAX_PACK + 1), 10, 400),
    ("bytes 99999999999999999999-99999999999999999999/99999999999999999999999", 1, 400),
])
def test_content_range_mismatches(env: Env, content_range: str, body_len: int, status: int) -> None:
    fresh = os.urandom(32).hex()
    before = db_snapshot(env.data)
    a = call(env.port, "PUT", f"{env.p}/packs/{fresh}", os.urandom(body_len),
             {**bearer(env.alice), "Content-Range": content_range})
    err = assert_json_error(a, status)
    if status == 409:
        assert err["details"].get("offset") == 0, err
    assert db_snapshot(env.data) == before
    st = call(env.port, "GET", f"{env.p}/uploads/{fresh}", headers=bearer(env.alice)).json()
    assert st == {"complete": False, "offset": 0}
    assert not (env.data / "uploads" / "alice" / f"{fresh}.part").exists() or \
        (env.data / "uploads" / "alice" / f"{fresh}.part").stat().st_size == 0


@pytest.mark.parametrize("method", ["PUT", "POST"])
@pytest.mark.parametrize("content_range", ["bytes */10", "bytes */0", "bytes */-1", "bytes */abc", "bytes */",
                                           "bytes */99999999999999999999999"])
def test_finish_form_without_a_partial(env: Env, method: str, content_range: str) -> None:
    """``Content-Range: bytes */TOTAL`` asks the server to verify a partial that is
    already complete. With no partial there is nothing to finish: never a 5xx, and
    nothing may appear on disk.

    ("bytes */0" is a BUG: have == total == 0 sends a missing partial to adoption,
    adopt_pack's open() raises FileNotFoundError, errors_mw turns it into CacheError,
    which wire._STATUS does not map: HTTP 500. isrsync/server/app.py _put_pack_locked
    should require 1 <= TOTAL <= MAX_PACK and an existing partial.)
    """
    fresh = os.urandom(32).hex()
    before = db_snapshot(env.data)
    a = call(env.port, method, f"{env.p}/packs/{fresh}", b"", {**bearer(env.alice), "Content-Range": content_range})
    assert a.status < 500, a
    if a.status == 202:
        assert a.json() == {"complete": False, "offset": 0}
    else:
        assert_json_error(a, 400, 409)
    assert db_snapshot(env.data) == before
    assert not (env.data / "uploads" / "alice" / f"{fresh}.part").exists()


def test_chunked_upload_without_length_or_range_is_400(env: Env) -> None:
    fresh = os.urandom(32).hex()
    head = (f"PUT {env.p}/packs/{fresh} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.alice}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    a = raw_answer(env.port, head + b"14\r\n" + b"z" * 20 + b"\r\n0\r\n\r\n")
    assert a is not None
    assert "Content-Length or Content-Range" in assert_json_error(a, 400)["error"]


def test_body_longer_than_content_length_is_not_taken_as_data(env: Env) -> None:
    """Extra bytes after Content-Length are the next request (garbage): 400s, nothing stored."""
    fresh = os.urandom(32).hex()
    junk = os.urandom(64)
    head = (f"PUT {env.p}/packs/{fresh} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.alice}\r\n"
            "Content-Length: 16\r\n\r\n").encode()
    before = db_snapshot(env.data)
    a = raw_answer(env.port, head + junk)
    # The 16 bytes are a (garbage) whole pack: refused. The rest is a garbage next
    # request, which aiohttp's parser may answer first (a plain-text 400).
    assert a is not None and a.status in (400, 422), a
    assert db_snapshot(env.data) == before
    assert not (env.data / "uploads" / "alice" / f"{fresh}.part").exists()


def test_cut_upload_keeps_a_resumable_partial(env: Env) -> None:
    """Content-Length says more than arrives (the client died): what arrived is kept
    as the partial, the offset says so, and the upload resumes from there."""
    pid, path = _fresh_real_pack(env)
    data = path.read_bytes()
    half = len(data) // 2
    head = (f"PUT {env.p}/packs/{pid.hex()} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {env.alice}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    import socket
    import time

    s = socket.create_connection(("127.0.0.1", env.port))
    s.sendall(head + data[:half])
    time.sleep(0.3)
    s.close()
    deadline = time.time() + 10
    while True:
        st = call(env.port, "GET", f"{env.p}/uploads/{pid.hex()}", headers=bearer(env.alice)).json()
        if st["offset"] == half or time.time() > deadline:
            break
        time.sleep(0.05)
    assert st == {"complete": False, "offset": half}
    # A plain full PUT would start at 0: told where the server is instead.
    a = call(env.port, "PUT", f"{env.p}/packs/{pid.hex()}", data, bearer(env.alice))
    assert assert_json_error(a, 409)["details"]["offset"] == half
    a = call(env.port, "PUT", f"{env.p}/packs/{pid.hex()}", data[half:],
             {**bearer(env.alice), "Content-Range": f"bytes {half}-{len(data) - 1}/{len(data)}"})
    assert a.status == 201 and a.json() == {"complete": True, "size": len(data)}, a
    st = call(env.port, "GET", f"{env.p}/uploads/{pid.hex()}", headers=bearer(env.alice)).json()
    assert st == {"complete": True, "offset": len(data)}
    got = call(env.port, "GET", f"{env.p}/packs/{pid.hex()}", headers=bearer(env.alice))
    assert got.status == 200 and got.body == data
    assert not (env.data / "uploads" / "alice" / f"{pid.hex()}.part").exists()


_fresh_counter = [0]


def _fresh_real_pack(env: Env) -> tuple[bytes, Path]:
    _fresh_counter[0] += 1
    ch = env.chain.make_change(env.data.parent / f"fresh{_fresh_counter[0]}", 3)
    return ch.pack_id, ch.pack_path


# -- uploads: bytes that are not the pack ----------------------------------------------------------


def _mutations(real: bytes) -> dict[str, bytes]:
    flipped = bytearray(real)
    flipped[len(real) // 2] ^= 0x40
    footer = bytearray(real)
    footer[-60] ^= 1  # inside the footer's index hash
    return {
        "garbage": os.urandom(len(real)),
        "flipped-chunk-byte": bytes(flipped),
        "flipped-footer": bytes(footer),
        "truncated": real[:-1000],
        "header-only": real[:16],
        "trailing-junk": real + b"junk",
        "one-byte": b"I",
        "bad-version": real[:8] + b"\x09\x00" + real[10:],
    }


@pytest.mark.parametrize("what", ["garbage", "flipped-chunk-byte", "flipped-footer", "truncated", "header-only",
                                  "trailing-junk", "one-byte", "bad-version", "other-pack", "real-under-wrong-id"])
def test_pack_bytes_that_do_not_match_the_id_are_rejected(env: Env, what: str) -> None:
    pid, path = _fresh_real_pack(env)
    real = path.read_bytes()
    if what == "other-pack":
        body, target = env.pack_path.read_bytes(), pid  # a valid pack, but not this one
    elif what == "real-under-wrong-id":
        body, target = real, os.urandom(32)
    else:
        body, target = _mutations(real)[what], pid
    before_db, before_packs = db_snapshot(env.data), files_snapshot(env.data / "packs")
    a = call(env.port, "PUT", f"{env.p}/packs/{target.hex()}", body, bearer(env.alice))
    err = assert_json_error(a, 400, 422)
    assert err["kind"] in ("IntegrityError", "FormatError", "UnsupportedVersion"), err
    assert db_snapshot(env.data) == before_db
    assert files_snapshot(env.data / "packs") == before_packs
    assert leftover_uploads(env) == [], "a rejected pack must not leave its bytes behind"
    # And the right bytes are still accepted afterwards.
    if what not in ("other-pack", "real-under-wrong-id"):
        a = call(env.port, "PUT", f"{env.p}/packs/{pid.hex()}", real, bearer(env.alice))
        assert a.status == 201, a


@pytest.mark.parametrize("body", ["garbage", "empty-ish", "truncated"])
def test_garbage_under_a_known_pack_id_is_rejected_and_grants_nothing(env: Env, body: str) -> None:
    """BUG: repo.adopt_pack skips verification when a pack with that id already exists
    ("a pack already present is only staged"), so bytes that are *not* the pack are
    accepted (201) under its id. Bob, who never had alice's pack, uploads junk
    under its id and can then read alice's pack through his own parcel. The Store
    contract says put_pack verifies the pack against its id (IntegrityError otherwise).
    Fix: in adopt_pack verify ``src`` against ``pack_id`` even when the id is known
    (or at least compare the size and hash of the uploaded bytes), before staging.
    """
    real = env.pack_path.read_bytes()
    junk = {"garbage": os.urandom(len(real)), "empty-ish": b"\x00", "truncated": real[:-1]}[body]
    fresh = uuid.uuid4()  # a parcel of bob's own for each case (a failed case stages the pack)
    assert call(env.port, "POST", "/v1/parcels", json.dumps({"parcel": str(fresh), "name": f"b-{fresh.hex[:8]}"})
                .encode(), bearer(env.bob)).status == 201
    before = db_snapshot(env.data)
    bp = f"{API}/parcels/{fresh}"
    a = call(env.port, "PUT", f"{bp}/packs/{env.pack_id.hex()}", junk, bearer(env.bob))
    assert_json_error(a, 400, 422)
    assert db_snapshot(env.data) == before
    got = call(env.port, "GET", f"{bp}/packs/{env.pack_id.hex()}", headers=bearer(env.bob))
    assert got.status == 404 and got.body != real, "bob reads alice's pack through his own parcel"
    assert leftover_uploads(env) == []


def crafted_pack() -> bytes:
    """A pack whose footer says the index starts *before* the chunks just walked."""
    data = b"12345678"
    return (_HEADER.pack(MAGIC, 1, 0, 0) + _ENTRY.pack(tag_of(data), len(data)) + data
            + _FOOTER.pack(16, 1, 0, bytes(32), END_MAGIC))


def test_crafted_pack_with_backwards_index_is_rejected(env: Env) -> None:
    """BUG: pack.parse_trailer raises ValueError("tail too short for the index") when
    the footer's index offset points back into the chunks verify_stream already
    walked; repo.adopt_pack catches only IntegrityError/FormatError, so the
    upload gets HTTP 500 and its .part file is left behind in uploads/.
    """
    body = crafted_pack()
    target = hashlib.blake2b(body, digest_size=32).hexdigest()
    before = db_snapshot(env.data)
    a = call(env.port, "PUT", f"{env.p}/packs/{target}", body, bearer(env.alice))
    assert_json_error(a, 400, 422)
    assert db_snapshot(env.data) == before
    assert leftover_uploads(env) == []


# -- versions and commits ----------------------------------------------------------------------------


@pytest.mark.parametrize("query,status", [
    ("first=2&last=2", 404), ("first=0&last=0", 404), ("first=1&last=5", 404), ("first=2&last=1", 404),
    ("first=-1&last=1", 404), ("first=1&last=200000", 404), ("first=abc&last=1", 400), ("first=1", 400),
    ("", 400), ("first=1.5&last=2", 400), ("first=%ff&last=1", 400), ("first=" + "9" * 5000 + "&last=1", 400),
])
def test_unknown_versions(env: Env, query: str, status: int) -> None:
    a = call(env.port, "GET", f"{env.p}/manifests?{query}", headers=bearer(env.alice))
    assert_json_error(a, status)


def test_known_version_is_served(env: Env) -> None:
    a = call(env.port, "GET", f"{env.p}/manifests?first=1&last=1", headers=bearer(env.alice))
    assert a.status == 200
    (m,) = wire.unframe_blobs(a.body)
    assert env.chain.head is not None and hashlib.blake2b(m, digest_size=32).digest() == env.chain.head.hash


def _commit_body(meta: dict, payload: bytes = b"") -> bytes:
    raw = json.dumps(meta).encode()
    return struct.pack("<I", len(raw)) + raw + payload


def _meta_of(body: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<I", body)
    return json.loads(body[4 : 4 + n]), body[4 + n :]


@pytest.mark.parametrize("case", [
    "empty", "short-prefix", "meta-length-huge", "meta-not-json", "meta-array", "missing-keys",
    "negative-count", "count-too-big", "truncated-tags", "extra-byte", "packs-not-hex", "epoch-string",
    "manifest-garbage", "stale-epoch-v2", "wrong-parent", "replay-v1",
])
def test_malformed_commits(env: Env, case: str) -> None:
    meta, payload = _meta_of(env.commit_v2)
    m1, p1 = _meta_of(env.commit_v1)
    bodies = {
        "empty": b"",
        "short-prefix": b"\x01\x00",
        "meta-length-huge": struct.pack("<I", 0xFFFFFFFF) + b"{}",
        "meta-not-json": struct.pack("<I", 4) + b"{{{{",
        "meta-array": _commit_body([1, 2, 3]),  # type: ignore[arg-type]
        "missing-keys": _commit_body({"epoch": 1}),
        "negative-count": _commit_body({**meta, "added": -1}, payload),
        "count-too-big": _commit_body({**meta, "added": meta["added"] + 1}, payload),
        "truncated-tags": env.commit_v2[:-5],
        "extra-byte": env.commit_v2 + b"\x00",
        "packs-not-hex": _commit_body({**meta, "packs": ["zz"]}, payload),
        "epoch-string": _commit_body({**meta, "epoch": "one"}, payload),
        "manifest-garbage": _commit_body({**meta, "manifest": 10, "added": 0, "removed": 0, "memory": 0}, b"x" * 10),
        "stale-epoch-v2": env.commit_v2,
        "wrong-parent": _commit_body({**meta, "parent": 5}, payload),
        "replay-v1": env.commit_v1,
    }
    before = db_snapshot(env.data)
    a = call(env.port, "POST", f"{env.p}/commit", bodies[case], bearer(env.alice))
    if case == "replay-v1":
        # A retried commit that already landed gets the same answer and changes nothing.
        assert a.status == 201 and a.json()["version"] == 1, a
    elif case in ("stale-epoch-v2", "wrong-parent"):
        err = assert_json_error(a, 409)
        assert "local changes are kept" in err["hint"], err
    else:
        assert_json_error(a, 400, 422)
    assert db_snapshot(env.data) == before
    versions = call(env.port, "GET", f"{env.p}/versions", headers=bearer(env.alice)).json()
    assert [v["version"] for v in versions] == [1]


@pytest.mark.parametrize("case", ["manifests-first-huge", "commit-epoch-inf", "commit-parent-2**63",
                                  "commit-epoch-1e30", "release-epoch-huge"])
def test_huge_numbers_are_4xx(env: Env, case: str) -> None:
    """BUG (three of these): Python ints beyond SQLite's 64 bits and JSON 1e400 (inf).

    * GET manifests?first=10**20: repo.get_manifests binds it -> OverflowError -> 500.
    * commit meta {"epoch": 1e400}: wire.decode_commit int(inf) -> OverflowError (not
      caught: it is not a ValueError) -> 500.
    * commit meta {"parent": 2**63-1} with a well-formed manifest: repo.commit binds
      parent + 1 -> OverflowError -> 500.
    """
    meta, payload = _meta_of(env.commit_v2 if "epoch" in case else env.commit_v1)
    before = db_snapshot(env.data)
    if case == "manifests-first-huge":
        a = call(env.port, "GET", f"{env.p}/manifests?first={10**20}&last={10**20}", headers=bearer(env.alice))
    elif case == "commit-epoch-inf":
        raw = json.dumps(meta).replace(f'"epoch": {meta["epoch"]}', '"epoch": 1e400').encode()
        a = call(env.port, "POST", f"{env.p}/commit", struct.pack("<I", len(raw)) + raw + payload, bearer(env.alice))
    elif case == "commit-epoch-1e30":
        a = call(env.port, "POST", f"{env.p}/commit", _commit_body({**meta, "epoch": 10**30}, payload), bearer(env.alice))
    elif case == "commit-parent-2**63":
        a = call(env.port, "POST", f"{env.p}/commit", _commit_body({**meta, "parent": 2**63 - 1}, payload),
                 bearer(env.alice))
    else:
        a = call(env.port, "POST", f"{env.p}/lock/release", json.dumps({"epoch": 10**30}).encode(), bearer(env.alice))
    assert a.status < 500, a
    assert_json_error(a)
    assert db_snapshot(env.data) == before


# -- lock hand-over ---------------------------------------------------------------------------


def _hand_over(env: Env, pid: uuid.UUID | str, body: dict, token: str | None = None) -> Answer:
    return call(env.port, "POST", f"{API}/parcels/{pid}/lock/hand-over", json.dumps(body).encode(),
                bearer(token or env.alice))


MEDIUM_BODY = {"site": "medium:3f0c9a7e", "host": "KINGSTON-16G"}


@pytest.mark.parametrize("case", ["free-at-its-epoch", "free-stale-epoch", "free-future-epoch", "never-locked"])
def test_hand_over_of_a_free_lock_is_409(env: Env, case: str) -> None:
    """p1's lock is free at epoch 1 (released by its commit)."""
    before = db_snapshot(env.data)
    if case == "never-locked":
        q = uuid.uuid4()
        assert call(env.port, "POST", "/v1/parcels", json.dumps({"parcel": str(q), "name": f"ho-{q.hex[:8]}"}).encode(),
                    bearer(env.alice)).status == 201
        before = db_snapshot(env.data)
        a, server_epoch = _hand_over(env, q, {"epoch": 0, **MEDIUM_BODY}), 0
    else:
        epoch = {"free-at-its-epoch": 1, "free-stale-epoch": 0, "free-future-epoch": 2}[case]
        a, server_epoch = _hand_over(env, env.pid, {"epoch": epoch, **MEDIUM_BODY}), 1
    err = assert_json_error(a, 409)
    assert err["kind"] == "Conflict" and "nobody holds it" in err["error"], err
    assert err["details"] == {"epoch": server_epoch}, err
    assert db_snapshot(env.data) == before


@pytest.mark.parametrize("who,pid", [("bob", "alices"), ("alice", "ghost"), ("alice", "name")])
def test_hand_over_of_a_parcel_not_yours_is_404_or_400(env: Env, who: str, pid: str) -> None:
    before = db_snapshot(env.data)
    ref = {"alices": env.pid, "ghost": uuid.uuid4(), "name": "p1"}[pid]
    a = _hand_over(env, ref, {"epoch": 1, **MEDIUM_BODY}, env.bob if who == "bob" else env.alice)
    err = assert_json_error(a, 404 if pid != "name" else 400)
    assert "alice" not in err["error"] and "site-a" not in err["error"], err
    assert db_snapshot(env.data) == before


@pytest.mark.parametrize("site", ["", "medium:"])
def test_hand_over_to_no_one_is_400(env: Env, site: str) -> None:
    before = db_snapshot(env.data)
    err = assert_json_error(_hand_over(env, env.pid, {"epoch": 1, "site": site, "host": "KEY"}), 400)
    assert err["kind"] == "UsageError", err
    assert db_snapshot(env.data) == before


def test_hand_over_answers_and_fences_over_http(env: Env) -> None:
    """On a parcel of its own: the answer is a lock object; a stale epoch is 409 with
    the server's epoch and holder; the retried request answers alike."""
    q = uuid.uuid4()
    assert call(env.port, "POST", "/v1/parcels", json.dumps({"parcel": str(q), "name": f"ho-{q.hex[:8]}"}).encode(),
                bearer(env.alice)).status == 201
    p = f"{API}/parcels/{q}"
    got = call(env.port, "POST", f"{p}/lock", json.dumps({"site": "site-a", "host": "host-a"}).encode(), bearer(env.alice))
    assert got.status == 200 and got.json()["epoch"] == 1
    body = {"epoch": 1, "site": "medium:3f0c9a7e" + "x" * 300, "host": "KINGSTON-16G"}
    a = _hand_over(env, q, body)
    assert a.status == 200, a
    lock = a.json()
    assert set(lock) == {"parcel", "epoch", "version", "holder", "hardware"}
    assert (lock["parcel"], lock["epoch"], lock["version"]) == (str(q), 2, 0)
    assert lock["holder"]["site"] == ("medium:3f0c9a7e" + "x" * 300)[:200]  # cut like an acquire's
    assert (lock["holder"]["host"], lock["holder"]["user"]) == ("KINGSTON-16G", "alice")
    assert _hand_over(env, q, body).json() == lock  # a retry whose answer was lost
    assert call(env.port, "GET", f"{p}/lock", headers=bearer(env.alice)).json() == lock
    stale = assert_json_error(_hand_over(env, q, {"epoch": 1, "site": "site-b", "host": "host-b"}), 409)
    assert stale["kind"] == "Conflict"
    assert stale["details"] == {"epoch": 2, "site": lock["holder"]["site"], "host": "KINGSTON-16G"}, stale
    held = assert_json_error(call(env.port, "POST", f"{p}/lock", json.dumps({"site": "site-b", "host": "h"}).encode(),
                                  bearer(env.alice)), 423)
    assert "carried away on medium KINGSTON-16G" in held["error"] and "--from-usb" in held["hint"], held
    assert call(env.port, "POST", f"{p}/lock/release", json.dumps({"epoch": 1}).encode(),
                bearer(env.alice)).status == 409


# -- fuzz ---------------------------------------------------------------------------------------------


TEMPLATES = [
    ("GET", "/v1/health"), ("GET", "/v1/keybundle"), ("PUT", "/v1/keybundle"), ("POST", "/v1/parcels"),
    ("GET", "/v1/parcels"), ("GET", "/v1/parcels/{parcel}"), ("GET", "/v1/parcels/{parcel}/versions"),
    ("GET", "/v1/parcels/{parcel}/manifests"), ("GET", "/v1/parcels/{parcel}/uploads/{pack}"),
    ("PUT", "/v1/parcels/{parcel}/packs/{pack}"), ("POST", "/v1/parcels/{parcel}/packs/{pack}"),
    ("GET", "/v1/parcels/{parcel}/packs/{pack}"),
    ("POST", "/v1/parcels/{parcel}/have-packs"), ("POST", "/v1/parcels/{parcel}/locate"),
    ("GET", "/v1/parcels/{parcel}/lock"), ("POST", "/v1/parcels/{parcel}/lock"),
    ("POST", "/v1/parcels/{parcel}/lock/release"), ("POST", "/v1/parcels/{parcel}/lock/break"),
    ("POST", "/v1/parcels/{parcel}/lock/hand-over"), ("POST", "/v1/parcels/{parcel}/commit"),
]
# Uploads and commits are where the work (and the risk) is: ask them more often.
WEIGHTS = [2 if "/packs/" in t and m != "GET" else 2 if t.endswith("/commit") else 1 for m, t in TEMPLATES]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "get", "BREW", "PUT ", ""]
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


@dataclass
class FuzzRequest:
    method: str
    template: str
    path: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    chunked: bool
    valid_auth: bool
    cross_user: bool  # a real parcel of the *other* user
    raw: bytes = b""

    def wire(self) -> bytes:
        if self.raw:
            return self.raw
        lines = [f"{self.method} {self.path} HTTP/1.1".encode("latin-1", "replace"), b"Host: 127.0.0.1"]
        lines += [k + b": " + v for k, v in self.headers]
        if self.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            body = b"".join(b"%x\r\n%s\r\n" % (len(self.body[i:i + 7000]), self.body[i:i + 7000])
                            for i in range(0, len(self.body), 7000)) + b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % len(self.body))
            body = self.body
        lines.append(b"Connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def describe(self) -> str:
        if self.raw:
            return f"raw {self.raw[:200]!r}"
        hdrs = {k.decode("latin-1"): v[:100].decode("latin-1") for k, v in self.headers
                if k != b"Authorization" or not self.valid_auth}
        return (f"{self.method} {self.path[:200]} (template {self.template}) headers={hdrs} "
                f"chunked={self.chunked} body[{len(self.body)}]={self.body[:120]!r}")


class Fuzzer:
    """Builds malformed requests from the real routes; never a request that may change state.

    With a valid token the bodies of state-changing routes are always invalid
    (wrong types, broken JSON or framing) and every pack upload is either a whole
    (garbage) pack under a fresh id, whose verification must fail, or has a
    broken Content-Range, so no request can legitimately leave a partial upload.
    """

    def __init__(self, env: Env, seed: int) -> None:
        self.e = env
        self.r = random.Random(seed)
        self.real_pack = env.pack_path.read_bytes()

    # -- pieces ------------------------------------------------------------------------------
    def below(self, n: int) -> int:
        """A random index below n that uses the same randomness whatever n is, so the
        sequence of requests does not depend on the (random) sizes of the real packs."""
        return int(self.r.random() * n)

    def junk(self, n: int | None = None) -> str:
        r = self.r
        n = r.randint(0, 40) if n is None else n
        alphabet = "abcdefghijklmnopqrstuvwxyz0123456789-_.~%/ABCDEF"
        return "".join(r.choice(alphabet) for _ in range(n))

    def parcel_seg(self) -> tuple[str, bool, bool]:
        """(segment, is a real parcel of the token's user, is the other user's real parcel)."""
        r, e = self.r, self.e
        x = r.random()
        if x < 0.45:
            return str(e.pid), True, False
        if x < 0.52:
            return "p1", True, False
        if x < 0.60:
            return str(e.bob_pid), False, True
        choices = [
            str(uuid.UUID(int=r.getrandbits(128))), str(e.pid).upper(), str(e.pid)[:-1], str(e.pid) + "0",
            "{" + str(e.pid) + "}", "urn:uuid:" + str(e.pid), "..%2F..%2Fetc%2Fpasswd", "..", ".", "%2e%2e",
            "a" * r.randint(100, 4000), "%C3%A9" * r.randint(1, 50), "%00", "%ff", "", "bobs",
            str(e.pid).replace("-", ""), self.junk(), "%F0%9F%92%A5", "..%5C..%5Cstore.db", " " * 3,
        ]
        seg = r.choice(choices)
        real = seg in (str(e.pid).upper(), "{" + str(e.pid) + "}", "urn:uuid:" + str(e.pid),
                       str(e.pid).replace("-", ""))
        return seg, real, False

    def pack_seg(self, for_put: bool) -> tuple[str, bool]:
        """(segment, a valid-looking fresh id)."""
        r = self.r
        x = r.random()
        if x < 0.4:
            return r.getrandbits(256).to_bytes(32, "big").hex(), True
        if x < 0.55:
            return self.e.pack_id.hex(), False
        choices = [
            "ab" * 31, "ab" * 33, "g" * 64, "..%2F..%2Fetc%2Fpasswd", "../../x", "%C3%A9" * 32, "a" * r.randint(65, 3000),
            "0x" + "ab" * 31, "-1", "%00" * 64, self.junk(), self.e.pack_id.hex().upper(), "",
            self.e.pack_id.hex()[:-1] + "%ff",
        ]
        if not for_put:
            choices += ["%20" * 64, "ab" * 31 + "%20%20"]
        return r.choice(choices), False

    def auth(self) -> tuple[list[tuple[bytes, bytes]], bool, str]:
        r, e = self.r, self.e
        x = r.random()
        if x < 0.72:
            return [(b"Authorization", f"Bearer {e.alice}".encode())], True, "alice"
        if x < 0.78:
            return [(b"Authorization", f"Bearer {e.bob}".encode())], True, "bob"
        bad = [
            [], [(b"Authorization", b"Bearer " + e.alice[:-2].encode())], [(b"Authorization", b"Basic Zm9vOmJhcg==")],
            [(b"Authorization", b"Bearer")], [(b"Authorization", b"Bearer " + b"x" * r.randint(1, 900))],
            [(b"Authorization", b"bearer " + e.alice.encode())], [(b"Authorization", b"")],
            [(b"Authorization", b"Bearer " + e.alice.encode()), (b"Authorization", b"Bearer nope")],
            [(b"Authorization", b"Bearer " + bytes(r.randint(0x80, 0xFF) for _ in range(r.randint(1, 20))))],
        ]
        return r.choice(bad), False, ""

    def wrong_object(self) -> bytes:
        """A JSON object in which *every* field a route reads has a wrong type."""
        r = self.r
        wrong_str = [1, -1, 1.5, None, True, [], {}, ["s"], 10**30]
        wrong_int = ["1", "", None, 1.5, True, [], {}, "1e3", 1e400]
        wrong_list = ["abc", 1, None, {}, True, "[]"]
        obj = {
            "parcel": r.choice(wrong_str), "name": r.choice(wrong_str), "hardware": r.choice(wrong_str),
            "site": r.choice(wrong_str), "host": r.choice(wrong_str), "epoch": r.choice(wrong_int),
            "reason": r.choice(wrong_str), "packs": r.choice(wrong_list), "tags": r.choice(wrong_list),
        }
        for _ in range(r.randint(0, 3)):
            obj[self.junk(r.randint(1, 8))] = r.choice(wrong_str + wrong_int)
        items = list(obj.items())
        r.shuffle(items)
        try:
            return json.dumps(dict(items)).encode()
        except ValueError:
            return b"{}"

    def json_body(self, route: str, valid_auth: bool) -> bytes:
        r = self.r
        x = r.random()
        if x < 0.30:
            return self.wrong_object()
        if x < 0.45:
            return r.choice([b"", b"{", b"}", b"[", b"null", b"[]", b"0", b'"x"', b"true", b"{'a': 1}",
                             b'{"site": "s",}', b"\xff\xfe{}", b"{\"a\": NaN", b"{\"reason\": Infinity, \"epoch\": NaN, \"site\": -Infinity}", b"\x00" * 10])
        if x < 0.55:
            return self.wrong_object()[: r.randint(0, 40)]
        if x < 0.62:
            depth = r.choice([10, 100, 1000, 50_000])
            # (Nested under "reason", so that even a shallow one is no valid lock break.)
            return b"[" * depth + b"]" * depth if r.random() < 0.5 else b'{"reason":' * depth + b"1" + b"}" * depth
        if x < 0.70:
            return r.randbytes(r.randint(0, 3000))
        if x < 0.72:
            return b" " * (wire.MAX_JSON + r.randint(1, 1000))
        # Read-only routes may get well-formed bodies too (they change nothing).
        if route.endswith("/have-packs") or route.endswith("/locate"):
            key = "packs" if route.endswith("/have-packs") else "tags"
            ids = [r.getrandbits(256).to_bytes(32, "big").hex() for _ in range(r.randint(0, 50))]
            if r.random() < 0.5:
                ids.append(self.e.pack_id.hex())
            if r.random() < 0.3:
                ids.append(self.junk())
            return json.dumps({key: ids}).encode()
        if route.endswith("/lock/release"):
            return json.dumps({"epoch": r.choice([0, 1, 2, -1, 10**30, 2**63, -(2**63)])}).encode()
        return self.wrong_object()

    def pack_body(self) -> bytes:
        r = self.r
        real = self.real_pack
        x = r.random()
        if x < 0.25:
            return r.randbytes(r.randint(0, 200_000))
        if x < 0.40:
            b = bytearray(real)
            for _ in range(r.randint(1, 5)):
                b[self.below(len(b))] = r.randrange(256)
            return bytes(b)
        if x < 0.50:
            return real[: self.below(len(real))]
        if x < 0.55:
            return real + r.randbytes(r.randint(1, 100))
        if x < 0.62:
            return real[:16] + r.randbytes(r.randint(0, 5000))
        if x < 0.70:
            # A plausible shape with a random footer (some point backwards).
            data = r.randbytes(r.randint(1, 64))
            body = _HEADER.pack(MAGIC, 1, 0, 0) + _ENTRY.pack(tag_of(data), len(data)) + data
            off = r.choice([16, 0, len(body), r.getrandbits(64)])
            count = r.choice([0, 1, 2, r.getrandbits(32)])
            return body + r.randbytes(r.randint(0, 100)) + _FOOTER.pack(off, count, 0, r.randbytes(32), END_MAGIC)
        if x < 0.72:
            return crafted_pack()
        if x < 0.80:
            return b""
        return r.randbytes(r.randint(1, 100))

    def commit_body(self) -> bytes:
        r, e = self.r, self.e
        base = r.choice([e.commit_v1, e.commit_v2])
        x = r.random()
        if x < 0.15:
            return base  # replay of v1 (no change) or stale-epoch v2 (refused)
        if x < 0.35:
            return base[: self.below(len(base))]
        if x < 0.50:
            b = bytearray(base)
            for _ in range(r.randint(1, 8)):
                b[self.below(len(b))] = r.randrange(256)
            return bytes(b)
        if x < 0.75:
            meta, payload = _meta_of(base)
            k = r.choice(list(meta))
            meta[k] = r.choice([None, -1, 0, 1, 2, 10**30, 2**63 - 1, 2**64, "x", [], {}, True, 1.5, ["zz"],
                                "1e400", [e.pack_id.hex()] * 3])
            raw = json.dumps(meta).encode()
            if r.random() < 0.2:
                raw = raw.replace(b"1.5", b"1e400")
            return struct.pack("<I", len(raw)) + raw + payload
        if x < 0.85:
            return struct.pack("<I", r.getrandbits(32)) + r.randbytes(r.randint(0, 500))
        return r.randbytes(r.randint(0, 2000))

    def content_range(self, body_len: int) -> bytes:
        r = self.r
        n = max(body_len, 1)
        forms = [
            f"bytes 0-{n - 1}/{n}", f"bytes 0-{n - 1}/{n + r.randint(1, 100)}", f"bytes {r.randint(1, 9)}-{n}/{n + 10}",
            f"bytes 0-{n}/{n}", f"bytes {n}-0/{n}", f"bytes=0-{n - 1}/{n}", "bytes */*", f"bytes 0-{n - 1}",
            f"bytes -{n}/{n}", f"bytes 0-{n - 1}/{wire.MAX_PACK + 1}", f"bytes {2**70}-{2**70 + 1}/{2**71}",
            self.junk(), f"bytes 0-{n - 1}/{n} ", "bytes ０-１/２",
            f"bytes */{n}", "bytes */0", "bytes */", "bytes */abc", f"bytes */{2**70}",
        ]
        return r.choice(forms).encode()

    # -- whole requests -------------------------------------------------------------------------
    def make(self) -> FuzzRequest:
        r = self.r
        if r.random() < 0.05:
            return self.raw_garbage()
        method, template = r.choices(TEMPLATES, WEIGHTS)[0]
        headers, valid_auth, who = self.auth()
        real_parcel = cross = False
        path = template
        if "{parcel}" in path:
            seg, real_parcel, cross = self.parcel_seg()
            if who == "bob" and (real_parcel or cross):
                real_parcel, cross = cross, real_parcel  # bob's own parcel is the cross one for alice
            path = path.replace("{parcel}", seg)
        is_pack_put = method in ("PUT", "POST") and "/packs/" in template  # an upload
        if "{pack}" in path:
            seg, _ = self.pack_seg(is_pack_put)
            path = path.replace("{pack}", seg)
        if r.random() < 0.08:
            path = self.mutate_static(path)
        if r.random() < 0.15 or template.endswith("/manifests"):
            path += "?" + self.query()
        if r.random() < 0.2:
            method = r.choice(METHODS)
        # Body
        chunked = r.random() < 0.1
        if template.endswith("/commit"):
            body = self.commit_body()
        elif is_pack_put:
            body = self.pack_body()
        elif method in ("POST", "PUT") and template != "/v1/keybundle":
            body = self.json_body(template, valid_auth)
        elif template == "/v1/keybundle":
            body = r.randbytes(r.choice([0, 1, 100, 5000, wire.MAX_BUNDLE + 1]))
        else:
            body = r.randbytes(r.randint(0, 100)) if r.random() < 0.3 else b""
        # Headers
        if r.random() < 0.5:
            headers.append((b"Content-Type", r.choice([b"application/json", b"application/octet-stream",
                                                       b"text/plain", b"multipart/form-data; boundary=x",
                                                       b"application/x-www-form-urlencoded", self.junk().encode()])))
        if template == "/v1/keybundle" and r.random() < 0.7:
            headers.append((b"If-Match", r.choice([b"*none*", b"", b"zz", r.randbytes(32).hex().encode(),
                                                   self.junk().encode()])))
        if "/packs/" in template and method == "GET" and r.random() < 0.5:
            headers.append((b"Range", r.choice([b"bytes=0-10", b"bytes=zz", b"bytes=-5", b"bytes=99999999-",
                                                b"bytes=5-1", b"bytes=0-1,4-9", b"items=0-1", b"bytes=",
                                                b"bytes=0-" + str(2**70).encode()])))
        if (is_pack_put and r.random() < 0.6) or r.random() < 0.05:
            headers.append((b"Content-Range", self.content_range(len(body))))
        for _ in range(r.randint(0, 3)):
            headers.append((b"X-Fuzz-" + self.junk(r.randint(1, 10)).replace("%", "").replace("/", "").encode(),
                            bytes(r.choice(range(0x20, 0x7F)) for _ in range(r.randint(0, 60)))))
        req = FuzzRequest(method, template, path, headers, body, chunked, valid_auth, cross)
        if valid_auth and method in ("PUT", "POST") and "/packs/" in template:
            self.no_partial(req)
        return req

    def no_partial(self, req: FuzzRequest) -> None:
        """Make sure an authenticated pack PUT cannot legitimately stop half way."""
        crs = [v for k, v in req.headers if k == b"Content-Range"]
        if req.chunked:
            # Without a length the server writes until the body ends: give it no usable range.
            req.headers = [(k, v) for k, v in req.headers if k != b"Content-Range"]
            if self.r.random() < 0.5:
                req.headers.append((b"Content-Range", b"bytes 0-0"))
            return
        if not crs:
            if not req.body:
                req.body = b"\x00"  # an empty Content-Length body would be "no length"
            return
        m = _RANGE.match(crs[-1].decode("latin-1"))
        if m:
            start, end, total = (int(g) for g in m.groups())
            if start == 0 and start <= end < total and len(req.body) == end - start + 1 and end < total - 1:
                req.headers = [(k, v) for k, v in req.headers if k != b"Content-Range"]
                req.headers.append((b"Content-Range", f"bytes {start}-{end}/{end + 1}".encode()))

    def mutate_static(self, path: str) -> str:
        r = self.r
        ops = [
            lambda p: p.replace("/v1/", "/v2/", 1), lambda p: p + "/", lambda p: p.replace("/", "//", 2),
            lambda p: p.upper(), lambda p: p + "/" + self.junk(), lambda p: p.replace("lock", "lOck"),
            lambda p: p.rsplit("/", 1)[0], lambda p: "/" + self.junk() + p, lambda p: p.replace("/", "%2F"),
            lambda p: p + "%00", lambda p: p + "/..", lambda p: p.replace("parcels", "parcels/.."),
        ]
        return r.choice(ops)(path)

    def query(self) -> str:
        r = self.r
        vals = ["1", "0", "-1", "2", "abc", "", str(10**20), "1.5", "%ff", "9" * r.randint(1, 30), "1e3",
                str(2**63), "%20", "1&first=2"]
        parts = []
        for k in ("first", "last"):
            if r.random() < 0.85:
                parts.append(f"{k}={r.choice(vals)}")
        if r.random() < 0.3:
            parts.append(self.junk())
        return "&".join(parts)

    def raw_garbage(self) -> FuzzRequest:
        r, e = self.r, self.e
        forms = [
            r.randbytes(r.randint(1, 300)) + b"\r\n\r\n",
            b"GET /v1/health HTTP/9.9\r\n\r\n",
            b"GET\r\n\r\n",
            f"GET {e.p}/lock HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {e.alice}\r\nContent-Length: 5\r\n"
            "Content-Length: 6\r\nConnection: close\r\n\r\n12345".encode(),
            f"POST {e.p}/lock HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\n{}".encode(),
            f"POST {e.p}/lock HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
            "zz\r\n{}\r\n0\r\n\r\n".encode(),
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\nBad Header Line\r\nConnection: close\r\n\r\n",
            b"GET /v1/health HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\nConnection: close\r\n\r\n",
            b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            f"GET {e.p}/lock HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {e.alice}\r\nX-Bin: ".encode()
            + bytes(range(0x80, 0x100)) + b"\r\nConnection: close\r\n\r\n",
            f"PUT {e.p}/packs/{'ab' * 32} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {e.alice}\r\n"
            "Content-Length: -5\r\nConnection: close\r\n\r\n".encode(),
            f"PUT {e.p}/packs/{'ab' * 32} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {e.alice}\r\n"
            "Content-Length: abc\r\nConnection: close\r\n\r\n".encode(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + r.randbytes(100),  # a TLS hello
        ]
        return FuzzRequest("RAW", "raw", "", [], b"", False, False, False, raw=r.choice(forms))


def could_change_state(q: FuzzRequest) -> bool:
    """The generator's promise, checked independently: no request it made could
    legitimately change anything (so any change on disk is the server's fault)."""
    if not q.valid_auth or q.raw or q.method not in ("POST", "PUT"):
        return False
    path = q.path.split("?", 1)[0]
    try:
        body = json.loads(q.body)
    except (ValueError, RecursionError):
        body = None
    obj = body if isinstance(body, dict) else None
    if q.method == "POST" and path.endswith("/lock/break") and obj is not None:
        return not isinstance(obj.get("reason"), (int, float, list, dict, bool)) and (
            "reason" not in obj or isinstance(obj["reason"], str))
    if q.method == "POST" and path.endswith("/lock") and obj is not None:
        return isinstance(obj.get("site"), str) and isinstance(obj.get("host"), str)
    if q.method == "POST" and path.endswith("/lock/hand-over") and obj is not None:
        return (isinstance(obj.get("epoch"), int) and not isinstance(obj.get("epoch"), bool)
                and isinstance(obj.get("site"), str) and isinstance(obj.get("host"), str))
    if q.method == "POST" and path.rstrip("/").endswith("/v1/parcels") and obj is not None:
        return isinstance(obj.get("parcel"), str) and isinstance(obj.get("name"), str)
    if "/packs/" in path and not q.chunked:
        crs = [v for k, v in q.headers if k == b"Content-Range"]
        m = _RANGE.match(crs[-1].decode("latin-1")) if crs else None
        if m:
            start, end, total = (int(g) for g in m.groups())
            return start == 0 and len(q.body) == end + 1 and end < total - 1
    if "/packs/" in path and q.chunked:
        crs = [v for k, v in q.headers if k == b"Content-Range"]
        return bool(crs and _RANGE.match(crs[-1].decode("latin-1")))
    return False


def test_fuzz_malformed_requests(server_factory, tmp_path: Path) -> None:
    """3000+ malformed requests (fixed seed, 12 at a time): no 5xx, server alive,
    data directory unchanged (every SQLite row, every pack file), no stray uploads."""
    srv = server_factory()
    env = build_env(srv, tmp_path / "work")
    fuzz = Fuzzer(env, seed=20240611)
    requests = [fuzz.make() for _ in range(6000)]
    assert sum(1 for q in requests if q.valid_auth and q.method in ("PUT", "POST") and "/packs/" in q.template) > 300
    unsafe = [q.describe() for q in requests if could_change_state(q)]
    assert not unsafe, f"the fuzz generator made {len(unsafe)} possibly valid request(s): {unsafe[:3]}"
    before_db = db_snapshot(env.data)
    before_packs = files_snapshot(env.data / "packs")
    log_lines_before = len(access_log(srv.log))

    results: list[tuple[FuzzRequest, Answer | None | Exception]] = []

    async def run() -> None:
        sem = asyncio.Semaphore(12)

        async def one(q: FuzzRequest) -> None:
            async with sem:
                try:
                    a = await araw(env.port, q.wire(), timeout=60)
                except Exception as ex:  # noqa: BLE001 - recorded and judged below
                    a = ex
                results.append((q, a))

        await asyncio.gather(*(one(q) for q in requests))

    asyncio.run(run())

    problems: list[str] = []
    if srv.proc.poll() is not None:
        problems.append(f"the server died (exit {srv.proc.returncode})")
    elif not healthy(env.port):
        problems.append("the server no longer answers /v1/health")
    five = [(q, a) for q, a in results if isinstance(a, Answer) and a.status >= 500]
    # Group the 5xx by what the server said and by whether the token had non-ASCII
    # bytes (one cause each, as far as the outside can tell); two examples per group.
    groups: dict[tuple, list] = {}
    for q, a in five:
        odd_auth = any(k == b"Authorization" and any(c >= 0x80 for c in v) for k, v in q.headers)
        groups.setdefault((a.status, a.body[:90], odd_auth), []).append(q)
    for (status, said, odd_auth), qs in groups.items():
        routes = sorted({q.template for q in qs})
        problems.append(f"HTTP {status} x{len(qs)} saying {said!r}" + (" (non-ASCII bytes in the token)"
                        if odd_auth else "") + f" on {len(routes)} route(s), e.g.:")
        problems += [f"    {q.describe()}" for q in qs[:2]]
    hung = [(q, a) for q, a in results if isinstance(a, Exception)]
    for q, a in hung[:5]:
        problems.append(f"no answer ({type(a).__name__}: {a}) for {q.describe()}")
    # Where the app answered, it answered in JSON with an error message.
    not_json = []
    for q, a in results:
        if not isinstance(a, Answer) or q.raw or not 400 <= a.status < 500 or q.method == "HEAD":
            continue
        if a.status == 416 and "/packs/" in q.template:
            continue  # aiohttp's FileResponse answers an unsatisfiable Range itself
        ctype = a.headers.get("content-type", "")
        if ctype.startswith("application/json"):
            body = json.loads(a.body)
            if not (isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"]):
                not_json.append((q, a))
        elif not a.body.startswith((b"Invalid", b"Bad", b"Data after", b"Missing", b"Unexpected",
                                    b"Content-Length", b"Transfer-Encoding", b"Got more", b"Pause")):
            not_json.append((q, a))
    for q, a in not_json[:5]:
        problems.append(f"4xx without a JSON error: {a!r} for {q.describe()}")
    # Isolation: nothing of the other user's parcel is ever answered with success.
    leaks = [(q, a) for q, a in results if isinstance(a, Answer) and q.cross_user and q.valid_auth
             and 200 <= a.status < 300 and not q.raw]
    for q, a in leaks[:5]:
        problems.append(f"another user's parcel answered {a.status}: {q.describe()}")
    # The server's own log agrees: no 5xx recorded either.
    logged = [x for x in access_log(srv.log)[log_lines_before:] if x["status"] >= 500]
    if logged:
        problems.append(f"{len(logged)} 5xx in the access log, e.g. {logged[:3]}")
    for (where, exc), n in server_exceptions(srv.log).items():
        problems.append(f"server exception x{n}: {exc} at {where}")
    # Nothing changed on disk.
    if srv.proc.poll() is None:
        after_db = db_snapshot(env.data)
        for table in sorted(set(before_db) | set(after_db)):
            if before_db.get(table) != after_db.get(table):
                problems.append(f"table {table} changed: {len(before_db.get(table, []))} -> "
                                f"{len(after_db.get(table, []))} rows")
    if files_snapshot(env.data / "packs") != before_packs:
        problems.append("files under packs/ changed")
    stray = leftover_uploads(env)
    if stray:
        problems.append(f"partial uploads left behind: {stray[:5]} ({len(stray)})")
    statuses: dict[int, int] = {}
    for _, a in results:
        if isinstance(a, Answer):
            statuses[a.status] = statuses.get(a.status, 0) + 1
    assert len(results) == len(requests) >= 3000
    assert not problems, "\n".join(problems) + f"\nstatus counts: {sorted(statuses.items())}"
    # The fuzz must actually reach the handlers, not only bounce off auth and routing.
    for st in (200, 400, 401, 404, 409, 422):
        assert statuses.get(st, 0) > 0, f"no {st} answers: {sorted(statuses.items())}"
