"""Helpers for the home-server tests: raw HTTP, snapshots, real packs and version chains.

Imported by the test modules of this directory (``from srvkit import ...``); it is
not a test module itself.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import sqlite3
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from http.client import HTTPConnection

from isrsync import manifest as mf
from isrsync.chunk import CHUNK_SIZE, tag_of
from isrsync.manifest import Keyring, Manifest
from isrsync.pack import PackWriter
from isrsync.site.packer import pack_stream
from isrsync.store.base import CommitRequest
from isrsync.vmspec import VmSpec

API = "/v1"


# -- raw HTTP ---------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:300]!r})"


def call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One request over a fresh http.client connection (no retries, no magic)."""
    c = HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        c.close()


def raw(port: int, data: bytes, timeout: float = 10.0, half_close: bool = True) -> bytes:
    """Send raw bytes, read until the server closes (or times out); returns what came back."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while True:
            try:
                b = s.recv(65536)
            except (socket.timeout, ConnectionResetError):
                break
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        s.close()


def raw_answer(port: int, data: bytes, timeout: float = 10.0) -> Answer | None:
    """Send raw bytes (keeping the connection open) and parse one HTTP response.

    Returns None when the server closed the connection without answering.
    """
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer (and close) before reading everything
        buf = bytearray()
        while b"\r\n\r\n" not in buf:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                b = b""
            if not b:
                return None
            buf += b
        head, _, rest = bytes(buf).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        n = int(headers.get("content-length", "0"))
        body = bytearray(rest)
        while len(body) < n:
            try:
                b = s.recv(65536)
            except ConnectionResetError:
                break
            if not b:
                break
            body += b
        return Answer(status, headers, bytes(body[:n]))
    finally:
        s.close()


async def araw(port: int, data: bytes, timeout: float = 30.0) -> Answer | None:
    """Send one raw request (it should say ``Connection: close``) and read the answer.

    Writing and reading run side by side, so a server that answers before it
    has read a large body (and then stops reading) does not stall the client.
    Returns None if the connection closed without a parsable answer.
    """
    import asyncio

    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)

    async def send() -> None:
        try:
            for i in range(0, len(data), 1 << 16):
                writer.write(data[i : i + (1 << 16)])
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    sender = asyncio.create_task(send())
    try:
        async def receive() -> bytes:
            buf = bytearray()
            while True:
                try:
                    b = await reader.read(1 << 16)
                except (ConnectionError, OSError):
                    break
                if not b:
                    break
                buf += b
                head, sep, rest = bytes(buf).partition(b"\r\n\r\n")
                if sep:
                    n = _content_length(head)
                    if n is not None and len(rest) >= n:
                        break
                    if n is None and b" 204 " in head.split(b"\r\n", 1)[0]:
                        break
            return bytes(buf)

        got = await asyncio.wait_for(receive(), timeout)
    finally:
        sender.cancel()
        try:
            await sender
        except BaseException:  # noqa: BLE001 - cancelled or failed: either way done
            pass
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass
    head, sep, rest = got.partition(b"\r\n\r\n")
    status = status_of(got)
    if status is None or not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    n = _content_length(head)
    return Answer(status, headers, rest if n is None else rest[:n])


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            try:
                return int(v.strip())
            except ValueError:
                return None
    return None


def status_of(resp: bytes) -> int | None:
    """Status code of the first HTTP response in ``resp`` (None if there is none)."""
    if not resp.startswith(b"HTTP/1."):
        return None
    try:
        return int(resp.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return None


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_json_error(a: Answer, *statuses: int) -> dict:
    """A 4xx answer with a JSON body {"error": "<non-empty message>", ...}."""
    assert 400 <= a.status < 500, a
    if statuses:
        assert a.status in statuses, a
    assert a.headers.get("content-type", "").startswith("application/json"), a
    body = a.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and body["error"].strip(), a
    return body


def healthy(port: int) -> bool:
    try:
        a = call(port, "GET", f"{API}/health", timeout=10)
    except OSError:
        return False
    return a.status == 200 and a.json().get("ok") is True


def access_log(log: Path) -> list[dict]:
    """The JSON access-log lines of a server's stderr."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"status"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def server_exceptions(log: Path) -> dict[tuple[str, str], int]:
    """Unhandled exceptions in a server's log, by (innermost isrsync frame, exception line).

    aiohttp's own parser errors (a malformed request line or header: answered 400
    by aiohttp itself) are left out.
    """
    import re

    out: dict[tuple[str, str], int] = {}
    for block in log.read_text(errors="replace").split("Error handling request")[1:]:
        lines = block.splitlines()
        exc = next((ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(: |$)", ln)
                    and not ln.startswith("Traceback")), "?")
        if exc.startswith("aiohttp.http_exceptions."):
            continue
        # One line per kind of failure: drop the variable parts (positions, characters).
        exc = re.sub(r"character '.*?' in position \d+|characters in position \d+-\d+", "character(s)", exc)
        frames = [ln.strip() for ln in lines if ln.strip().startswith("File ") and "/isrsync/" in ln]
        key = (frames[-1] if frames else "aiohttp", exc[:160])
        out[key] = out.get(key, 0) + 1
    return out


# -- data directory snapshots -------------------------------------------------------------


def db_snapshot(data: Path) -> dict[str, list[tuple]]:
    """Every table of store.db, rows sorted, read through a read-only connection."""
    uri = f"file:{data / 'store.db'}?mode=ro"
    db = sqlite3.connect(uri, uri=True)
    try:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
        return {t: sorted(db.execute(f'SELECT * FROM "{t}"').fetchall(), key=repr) for t in tables}
    finally:
        db.close()


def files_snapshot(root: Path) -> dict[str, str]:
    """Relative path -> BLAKE2b of every file under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# -- packs --------------------------------------------------------------------------------


def fast_pack(path: Path, nbytes: int, seed: int = 0) -> tuple[bytes, int]:
    """A valid pack of about ``nbytes`` of random 'ciphertext' chunks, quickly (no AEAD).

    The server only checks structure, tags and the id, which these satisfy.
    Returns (pack id, size).
    """
    import random

    rnd = random.Random(seed)
    with open(path, "wb") as f:
        w = PackWriter(f)
        block = rnd.randbytes(CHUNK_SIZE)
        n = 0
        while w.size < nbytes:
            # Cheap unique chunks: a counter prefix on a shared random block.
            data = n.to_bytes(8, "little") + rnd.randbytes(8) + block[16:]
            w.add(tag_of(data), data)
            n += 1
        info = w.finish()
    return info.pack_id, info.size


# -- version chains ----------------------------------------------------------------------


@dataclass
class Change:
    """New chunks at ``start..start+len(refs)`` and the pack that holds them."""

    start: int
    refs: list
    pack_id: bytes
    pack_path: Path
    pack_size: int


@dataclass
class Chain:
    """A client-side parcel history: builds real, chained manifests with delta keyrings.

    Every manifest this chain ever produced is remembered by hash, so after a
    crash the client can resynchronise to whatever the server's head is.
    """

    parcel: uuid.UUID
    disk_chunks: int = 512
    master: bytes = field(default_factory=lambda: os.urandom(32))
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    head: Manifest | None = None
    keyring: Keyring | None = None
    known: dict[bytes, tuple[bytes, Keyring]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.keyring is None:
            self.keyring = Keyring(self.disk_chunks * CHUNK_SIZE)

    @property
    def version(self) -> int:
        return self.head.version if self.head else 0

    def make_change(self, out_dir: Path, nchunks: int, start: int | None = None) -> Change:
        """Encode ``nchunks`` fresh random chunks with the real packer (pack_stream)."""
        assert 0 < nchunks <= self.disk_chunks
        if start is None:
            start = int.from_bytes(os.urandom(4), "little") % (self.disk_chunks - nchunks + 1)
        plain = os.urandom(nchunks * CHUNK_SIZE)
        out_dir.mkdir(parents=True, exist_ok=True)
        img = pack_stream(io.BytesIO(plain), len(plain), self.secret, out_dir, limit=1 << 40)
        assert len(img.packs) == 1, "one pack per change"
        info, path = img.packs[0]
        return Change(start, [img.keyring[i] for i in range(nchunks)], info.pack_id, path, info.size)

    def request(
        self, change: Change | None, epoch: int, *, release: bool = False, site: str = ""
    ) -> tuple[CommitRequest, Keyring]:
        """The commit of the next version (``change`` may be None: same disk, new manifest)."""
        ring = self.keyring.copy()
        dirty: list[int] = []
        packs: list[bytes] = []
        if change is not None:
            dirty = list(range(change.start, change.start + len(change.refs)))
            for i, ref in zip(dirty, change.refs):
                ring[i] = ref
            packs = [change.pack_id]
        old_tags, new_tags = self.keyring.tags(), ring.tags()
        version = self.version + 1
        raw = mf.encode(
            parcel=self.parcel, version=version, master_key=self.master, vm=VmSpec(machine="q35"),
            keyring=ring, parent=self.head, dirty=dirty if self.head else None, site=site,
        )
        req = CommitRequest(
            epoch=epoch, parent=version - 1, manifest=raw, packs=packs,
            added=sorted(new_tags - old_tags), removed=sorted(old_tags - new_tags),
            release=release, site=site,
        )
        self.known[mf.manifest_hash(raw)] = (raw, ring)
        return req, ring

    def landed(self, raw: bytes) -> None:
        """The server holds ``raw`` as its head: move this chain onto it."""
        h = mf.manifest_hash(raw)
        _, ring = self.known[h]
        self.head = mf.decode(raw, self.master, self.parcel)
        self.keyring = ring.copy()

    def resync(self, head_hash: bytes | None) -> None:
        """Follow the server: ``head_hash`` is its last version's manifest hash (None: no version)."""
        if head_hash is None:
            self.head, self.keyring = None, Keyring(self.disk_chunks * CHUNK_SIZE)
            return
        self.landed(self.known[head_hash][0])


def verify_chain(manifests: list[bytes], parcel: uuid.UUID, master: bytes | None = None) -> None:
    """Versions 1..N parse, chain by hash, and (with the key) decrypt and resolve."""
    prev_hash = mf.NO_PARENT
    decoded = []
    for i, raw in enumerate(manifests, start=1):
        h = mf.parse_header(raw)
        assert h.version == i and h.parcel == parcel, (i, h)
        assert h.parent == prev_hash, f"version {i}: parent hash breaks the chain"
        prev_hash = mf.manifest_hash(raw)
        if master is not None:
            decoded.append(mf.decode(raw, master, parcel))
    if master is not None and decoded:
        base = decoded[-1].header.keyring_base
        mf.resolve(decoded[base - 1 :])
