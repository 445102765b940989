"""Issue 14 against a real `isrsync serve`: bodies the server must refuse without a
5xx, tokens that must never reach its log, Content-Range that must match the body,
and parcel ids that are per user.

Every request here is raw bytes over a loopback socket (``srvkit.araw``), so the
malformed ones reach the server exactly as written.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import sqlite3
import uuid
import zlib
from pathlib import Path
from typing import Callable, Iterator

import pytest

from isrsync.server.repo import Repository
from isrsync.store import wire

from srvkit import API, Answer, access_log, araw, db_snapshot, healthy, server_exceptions
from test_bad_input import Env, build_env

BODY_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def env(tmp_path_factory, live_server_cls) -> Iterator[Env]:
    work = tmp_path_factory.mktemp("hardening")
    # A short body timeout: a body that never comes is answered in a second.
    srv = live_server_cls(work / "data", extra=["--body-timeout", str(BODY_TIMEOUT)]).start()
    try:
        yield build_env(srv, work)
    finally:
        srv.kill()


def request(method: str, path: str, headers: list[tuple[str, str]] | list[tuple[bytes, bytes]], body: bytes = b"",
            *, length: bool = True) -> bytes:
    hs = [(k.encode("latin-1") if isinstance(k, str) else k, v.encode("latin-1") if isinstance(v, str) else v)
          for k, v in headers]
    names = {k.lower() for k, _ in hs}
    if length and b"content-length" not in names and b"transfer-encoding" not in names:
        hs.append((b"Content-Length", str(len(body)).encode()))
    head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in hs) + b"\r\n" + body


def run_all(port: int, reqs: list[tuple[str, bytes]], timeout: float = 20.0) -> list[tuple[str, Answer | None]]:
    async def go() -> list[tuple[str, Answer | None]]:
        sem = asyncio.Semaphore(16)

        async def one(label: str, raw: bytes) -> tuple[str, Answer | None]:
            async with sem:
                return label, await araw(port, raw, timeout=timeout)

        return await asyncio.gather(*(one(label, raw) for label, raw in reqs))

    return asyncio.run(go())


def chunked(body: bytes, size_line: bytes | None = None, end: bytes = b"0\r\n\r\n") -> bytes:
    return (size_line or f"{len(body):x}".encode()) + b"\r\n" + body + b"\r\n" + end


# -- 1. no request of any shape gets a 5xx ------------------------------------------------------------


def body_routes(e: Env) -> list[tuple[str, str, bytes]]:
    """Every route that reads a body, with a body of the right form that changes nothing
    (a name alice has, an epoch that is not the lock's, a commit cut short, no parcel)."""
    pack = os.urandom(32).hex()
    lock = json.dumps({"site": "s"}).encode()
    return [
        ("PUT", f"{API}/keybundle", b"sealed"),
        ("POST", f"{API}/parcels", json.dumps({"parcel": str(uuid.uuid4()), "name": "p1"}).encode()),
        ("PUT", f"{e.p}/packs/{pack}", os.urandom(64)),
        ("POST", f"{e.p}/packs/{pack}", os.urandom(64)),
        ("POST", f"{e.p}/have-packs", json.dumps({"packs": [pack]}).encode()),
        ("POST", f"{e.p}/locate", json.dumps({"tags": [pack]}).encode()),
        ("POST", f"{e.p}/lock", lock),
        ("POST", f"{e.p}/lock/release", b'{"epoch": 99}'),
        # A break needs no field at all: aimed at no parcel (the body is read first).
        ("POST", f"{API}/parcels/{uuid.uuid4()}/lock/break", b'{"reason": 5}'),
        ("POST", f"{e.p}/lock/hand-over", b'{"epoch": 99, "site": "s", "host": "h"}'),
        ("POST", f"{e.p}/commit", e.commit_v2[:-1]),
    ]


def gzip_bomb() -> bytes:
    # 64 MiB of zeros in about 64 KiB: what an inflating server would buffer.
    return gzip.compress(bytes(64 << 20), compresslevel=9)


def shapes(e: Env, bomb: bytes) -> dict[str, Callable[[str, str, bytes], bytes]]:
    auth = ("Authorization", f"Bearer {e.alice}")
    deep = b"[" * 100_000 + b"]" * 100_000

    def with_headers(*extra: tuple[str, str], body: bytes | None = None, length: bool = True):
        return lambda m, p, b: request(m, p, [auth, *extra], b if body is None else body, length=length)

    def te(value: str, payload: Callable[[bytes], bytes]):
        return lambda m, p, b: request(m, p, [auth, ("Transfer-Encoding", value)], payload(b), length=False)

    out: dict[str, Callable[[str, str, bytes], bytes]] = {
        # encodings
        "ce-gzip-garbage": with_headers(("Content-Encoding", "gzip"), body=b"not gzip at all"),
        "ce-deflate-garbage": with_headers(("Content-Encoding", "deflate"), body=b"\x00\x01garbage"),
        "ce-gzip-valid": lambda m, p, b: request(m, p, [auth, ("Content-Encoding", "gzip")], gzip.compress(b)),
        "ce-deflate-valid": lambda m, p, b: request(m, p, [auth, ("Content-Encoding", "deflate")], zlib.compress(b)),
        "ce-br": with_headers(("Content-Encoding", "br"), body=b"\x8b\x03\x80garbage"),
        "ce-zstd": with_headers(("Content-Encoding", "zstd"), body=b"(\xb5/\xfdgarbage"),
        "ce-list": with_headers(("Content-Encoding", "gzip, deflate"), body=b"garbage"),
        "ce-unknown": with_headers(("Content-Encoding", "x-nope")),
        "ce-twice": with_headers(("Content-Encoding", "gzip"), ("Content-Encoding", "deflate"), body=b"zz"),
        "ce-gzip-bomb": lambda m, p, b: request(m, p, [auth, ("Content-Encoding", "gzip")], bomb),
        "ce-gzip-chunked": lambda m, p, b: request(
            m, p, [auth, ("Content-Encoding", "gzip"), ("Transfer-Encoding", "chunked")], chunked(b"garbage"),
            length=False),
        # framing
        "te-gzip-chunked": te("gzip, chunked", lambda b: chunked(b"garbage")),
        "te-chunked-gzip": te("chunked, gzip", lambda b: chunked(b"garbage")),
        "te-deflate": te("deflate", lambda b: b"garbage"),
        "te-identity": te("identity", lambda b: b),
        "te-chunked-bad-size": te("chunked", lambda b: chunked(b, b"zz")),
        "te-chunked-huge-size": te("chunked", lambda b: chunked(b, b"ffffffffffffffffffff")),
        "te-chunked-negative": te("chunked", lambda b: chunked(b, b"-5")),
        "te-chunked-short": te("chunked", lambda b: chunked(b, f"{len(b) + 10:x}".encode())),
        "te-chunked-no-end": te("chunked", lambda b: chunked(b, end=b"")),
        "te-chunked-ext": te("chunked", lambda b: chunked(b, f"{len(b):x};ext=\x01".encode("latin-1"))),
        "te-and-cl": lambda m, p, b: request(
            m, p, [auth, ("Transfer-Encoding", "chunked"), ("Content-Length", str(len(b)))], chunked(b)),
        "cl-negative": with_headers(("Content-Length", "-1"), length=False),
        "cl-text": with_headers(("Content-Length", "abc"), length=False),
        "cl-float": with_headers(("Content-Length", "1e3"), length=False),
        "cl-two-values": lambda m, p, b: request(
            m, p, [auth, ("Content-Length", str(len(b))), ("Content-Length", str(len(b) + 1))], b, length=False),
        "cl-huge": lambda m, p, b: request(m, p, [auth, ("Content-Length", "9" * 30)], b, length=False),
        "cl-more-than-sent": lambda m, p, b: request(
            m, p, [auth, ("Content-Length", str(len(b) + 1000))], b, length=False),
        "cl-less-than-sent": lambda m, p, b: request(
            m, p, [auth, ("Content-Length", str(max(0, len(b) - 3)))], b + b"XYZ", length=False),
        # ranges
        "cr-garbage": with_headers(("Content-Range", "bytes zz")),
        "cr-finish-zero": with_headers(("Content-Range", "bytes */0"), body=b""),
        "cr-past-total": lambda m, p, b: request(m, p, [auth, ("Content-Range", f"bytes 0-{len(b)}/{len(b)}")], b),
        "cr-huge": with_headers(("Content-Range", f"bytes 0-{2**70}/{2**71}")),
        "cr-chunked-longer": lambda m, p, b: request(
            m, p, [auth, ("Content-Range", "bytes 0-9/1000"), ("Transfer-Encoding", "chunked")],
            chunked(os.urandom(500)), length=False),
        "cr-chunked-shorter": lambda m, p, b: request(
            m, p, [auth, ("Content-Range", "bytes 0-999/5000"), ("Transfer-Encoding", "chunked")],
            chunked(os.urandom(10)), length=False),
        "range-on-body": with_headers(("Range", "bytes=5-1")),
        # JSON (and bodies that are not)
        "json-truncated": with_headers(body=b'{"site": "s'),
        "json-deep": with_headers(body=deep),
        "json-huge-int": with_headers(body=b'{"epoch": 1' + b"0" * 5000 + b"}"),
        "json-nan": with_headers(body=b'{"epoch": NaN, "parcel": Infinity}'),
        "json-surrogate": with_headers(body=b'{"site": "\\ud800", "host": "\\udfff", "name": "\\ud800"}'),
        "json-not-utf8": with_headers(body=b'{"site": "\xff\xfe"}'),
        "json-array": with_headers(body=b"[1, 2, 3]"),
        "json-null": with_headers(body=b"null"),
        "json-dup-keys": with_headers(body=b'{"epoch": 1, "epoch": "x"}'),
        "empty": with_headers(body=b""),
        "content-type-multipart": with_headers(("Content-Type", "multipart/form-data; boundary=x")),
        "expect-continue": with_headers(("Expect", "100-continue")),
        "expect-odd": with_headers(("Expect", "200-ok")),
    }
    return out


def test_no_request_of_any_shape_gets_a_5xx(env: Env) -> None:
    """Issue 14, defect 1: malformed framing, encodings, ranges and JSON on every
    route that reads a body: no 5xx, no server exception, nothing changed."""
    before = db_snapshot(env.data)
    log_at = len(access_log(env.srv.log))
    reqs = []
    for name, make in shapes(env, gzip_bomb()).items():
        for method, path, body in body_routes(env):
            reqs.append((f"{name} {method} {path.replace(str(env.pid), '{p}')}", make(method, path, body)))
    got = run_all(env.port, reqs, timeout=20 + BODY_TIMEOUT)
    problems = [f"{label}: {a!r}" for label, a in got if a is not None and a.status >= 500]
    problems += [f"{label}: no answer" for label, a in got if a is None]
    problems += [f"5xx in the access log: {x}" for x in access_log(env.srv.log)[log_at:] if x["status"] >= 500][:5]
    problems += [f"server exception x{n}: {exc} at {where}" for (where, exc), n in server_exceptions(env.srv.log).items()]
    assert not problems, f"{len(problems)} problem(s) in {len(got)} requests:\n" + "\n".join(problems[:40])
    assert db_snapshot(env.data) == before


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "GZIP", "x-gzip"])
def test_encoded_bodies_are_refused_with_a_4xx_naming_the_header(env: Env, encoding: str) -> None:
    """Issue 14, defect 1: refused before anything is read or inflated, whether the
    body decodes or not, and the answer says which header."""
    body = json.dumps({"parcel": str(uuid.uuid4()), "name": "enc"}).encode()
    for payload in (gzip.compress(body), b"garbage"):
        [(_, a)] = run_all(env.port, [("x", request("POST", f"{API}/parcels", [
            ("Authorization", f"Bearer {env.alice}"), ("Content-Encoding", encoding)], payload))])
        assert a is not None and a.status == 415, a
        err = a.json()
        assert err["kind"] == "UnsupportedEncoding" and "Content-Encoding" in err["error"], err
    assert "enc" not in {r[2] for r in db_snapshot(env.data)["parcels"]}


def test_a_gzip_bomb_is_not_inflated(env: Env) -> None:
    """A 64 KiB gzip body of 64 MiB of zeros on the commit route (512 MiB limit):
    refused at once, and the server's memory does not grow by what it would inflate to."""
    rss = lambda: int(next(ln.split()[1] for ln in Path(f"/proc/{env.srv.proc.pid}/status").read_text().splitlines()
                           if ln.startswith("VmRSS:"))) * 1024
    bomb = gzip_bomb()
    before = rss()
    raw = request("POST", f"{env.p}/commit", [("Authorization", f"Bearer {env.alice}"),
                                              ("Content-Encoding", "gzip")], bomb)
    got = run_all(env.port, [("bomb", raw)] * 8)
    assert all(a is not None and a.status == 415 for _, a in got), got
    assert rss() - before < 32 << 20, f"server grew by {(rss() - before) >> 20} MiB"


# -- 7. Content-Range must match the body --------------------------------------------------------------


@pytest.mark.parametrize("content_range,sent", [
    ("bytes 0-9/1000", 500),    # the case: 10 bytes declared, 500 sent
    ("bytes 0-99/1000", 101),   # one byte too many
    ("bytes 0-99/1000", 99),    # one byte short, and the body ended
    ("bytes 0-999/1000", 10),   # the whole pack declared, a piece sent
    ("bytes 0-9/10", 0),        # nothing sent
])
def test_body_length_must_equal_its_content_range(env: Env, content_range: str, sent: int) -> None:
    """Issue 14, defect 7: a chunked body (no Content-Length to check up front)
    whose length differs from its Content-Range is refused and none of it is kept."""
    pack = os.urandom(32).hex()
    part = env.data / "uploads" / "alice" / f"{pack}.part"
    before = db_snapshot(env.data)
    raw = request("PUT", f"{env.p}/packs/{pack}", [
        ("Authorization", f"Bearer {env.alice}"), ("Content-Range", content_range),
        ("Transfer-Encoding", "chunked")], chunked(os.urandom(sent)) if sent else b"0\r\n\r\n", length=False)
    [(_, a)] = run_all(env.port, [("cr", raw)])
    assert a is not None and a.status == 400, a
    assert "Content-Range" in a.json()["error"], a
    assert not part.exists() or part.stat().st_size == 0, f"{part.stat().st_size} bytes kept"
    assert db_snapshot(env.data) == before


def test_a_matching_chunked_piece_is_taken(env: Env) -> None:
    """The refusal is for mismatches only: a chunked piece of exactly its range is kept."""
    pack = os.urandom(32).hex()
    raw = request("PUT", f"{env.p}/packs/{pack}", [
        ("Authorization", f"Bearer {env.alice}"), ("Content-Range", "bytes 0-99/1000"),
        ("Transfer-Encoding", "chunked")], chunked(os.urandom(100)), length=False)
    [(_, a)] = run_all(env.port, [("ok", raw)])
    assert a is not None and a.status == 202 and a.json() == {"complete": False, "offset": 100}, a


# -- 3. no token in the log --------------------------------------------------------------------------


def auth_fuzz(e: Env) -> list[bytes]:
    """Requests whose credentials are malformed in every way we could think of."""
    out = []
    for tok in (e.alice, e.bob):
        t = tok.encode()
        lines = [
            b"Authorization: Bearer " + t + b"\x00",
            b"Authorization: Bearer \x00" + t,
            b"Authorization: Bearer " + t[:10] + b"\x00" + t[10:],
            b"Authorization: Bearer " + t + b"\x7f",
            b"Authorization: Bearer " + t + b"\xff\xfe",
            b"Authorization: Bearer " + t + b"\r",
            b"Authorization: Bearer " + t[:20] + b"\r" + t[20:],
            b"Authorization: Bearer " + t + b"\x1b[0m",
            b"Authorization: " + t + b"\x00",
            b"Authorization:Bearer " + t + b"\x00",
            b"Authorization : Bearer " + t,
            b"Authorization\x00: Bearer " + t,
            b"Authorization\t: Bearer " + t + b"\x00",
            b"Authorization: Bearer\r\n " + t,  # obsolete line folding
            b"Proxy-Authorization: Bearer " + t + b"\x00",
            b"X-Token: " + t + b"\x00",
            b"Cookie: token=" + t + b"\x00",
            b"Authorization: Bearer " + t * 300,  # longer than a header line may be
            b"Authorization: Bearer " + t + b" " + b"x" * 9000,
            b"Bearer " + t + b"\x00",  # no header name at all
            t + b"\x00",
        ]
        for line in lines:
            for path in (f"{API}/parcels", f"{e.p}/lock", f"{API}/health"):
                out.append(f"GET {path} HTTP/1.1\r\nHost: x\r\n".encode() + line + b"\r\nConnection: close\r\n\r\n")
            out.append(f"POST {e.p}/lock HTTP/1.1\r\nHost: x\r\n".encode() + line
                       + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
        # The token where no header goes: the request line, a query, the path.
        out += [
            b"GET /v1/parcels?access_token=" + t + b"\x00 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /v1/parcels/" + t + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            b"GET /v1/" + t + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + t
            + b"\r\nConnection: close\r\n\r\n",
            b"BEARER " + t + b" /v1/parcels HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/parcels HTTP/1.1 " + t + b"\r\nHost: x\r\n\r\n",
            b"GET /v1/parcels HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + t
            + b"\r\nContent-Encoding: gzip\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        ]
    return out


def test_no_token_reaches_the_log(env: Env) -> None:
    """Issue 14, defect 3: after a run of malformed credentials (a trailing NUL made
    aiohttp log the raw header line, token included), no piece of a token in use
    is anywhere in the server's log."""
    reqs = [(f"auth-{i}", raw) for i, raw in enumerate(auth_fuzz(env))]
    got = run_all(env.port, reqs)
    assert all(a is None or a.status < 500 for _, a in got), [a for _, a in got if a and a.status >= 500][:3]
    assert healthy(env.port)
    log = env.srv.log.read_text(errors="replace")
    leaks = []
    for who, tok in (("alice", env.alice), ("bob", env.bob)):
        pieces = {tok[i:i + 12] for i in range(len(tok) - 11)}
        found = sorted({p for p in pieces if p in log})
        if found:
            at = log.find(found[0])
            leaks.append(f"{who}'s token: {len(found)} piece(s) in the log, e.g. ...{log[max(0, at - 80):at + 40]!r}")
    assert not leaks, "\n".join(leaks)
    assert "refused a malformed request" in log  # the fuzz did reach aiohttp's parser


# -- 4. schema 1 data directories carry on under per-user parcel ids -----------------------------------


def test_a_schema_1_data_directory_is_upgraded(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "d", create=True)
    repo.add_user("alice")
    pid = uuid.uuid4()
    repo.create_parcel("alice", pid, "old", "")
    repo.close()
    db = sqlite3.connect(tmp_path / "d" / "store.db")
    db.execute("DROP INDEX parcels_by_ext")
    db.execute("ALTER TABLE parcels DROP COLUMN ext")
    db.execute("UPDATE meta SET value='1' WHERE key='schema'")
    db.commit()
    db.close()
    repo = Repository(tmp_path / "d")
    try:
        assert [p.parcel for p in repo.list_parcels("alice")] == [pid]
        assert repo.acquire("alice", pid, wire.holder_from({"site": "s", "host": "h"})).epoch == 1
        assert repo._q("SELECT value FROM meta WHERE key='schema'") == [("2",)]
    finally:
        repo.close()
