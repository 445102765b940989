"""HttpStore: the Store protocol over the home server's HTTP API.

One pooled session per store (connections are reused); transient failures
(connection errors, timeouts, 502/503/504) are retried with exponential backoff
and jitter, and every request is safe to retry because the server makes its
mutations idempotent (a replayed commit, create, release, hand-over or bundle
put returns what the first one did). Anything else maps back to the error class
the server raised. Uploads resume from the server's offset after a cut.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import socket
import ssl
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Iterable
from urllib.parse import urlsplit

import aiohttp

from ..errors import Conflict, FormatError, IntegrityError, IsrError, NotFound, Unreachable, UsageError
from ..pack import PackEntry
from . import wire
from .base import CommitRequest, Holder, LockState, ParcelInfo, VersionInfo

TRANSIENT_STATUS = {502, 503, 504}
UPLOAD_PIECE = 64 << 20
READ_BLOCK = 1 << 20  # bytes of a pack file read per worker-thread hop while uploading


class HttpStore:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        cafile: str | Path | None = None,
        retries: int = 5,
        backoff: float = 0.2,
        connect_timeout: float = 10.0,
        read_timeout: float = 120.0,
        concurrency: int = 8,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise UsageError(f"{url!r} is not an http:// or https:// server address")
        self.url = url.rstrip("/")
        self._token = token
        self._retries = retries
        self._backoff = backoff
        # Set when a call used up its retries without reaching the server: later calls
        # try once each until one gets through. An offline suspend makes several calls,
        # and each used to spend the whole backoff (about 6 s) on a server known gone.
        self._unreachable = False
        self._ssl: ssl.SSLContext | bool = True
        if cafile is not None:
            self._ssl = ssl.create_default_context(cafile=str(cafile))
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._limit = concurrency
        self._session: aiohttp.ClientSession | None = None

    def _sess(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._limit, ssl=self._ssl),
                timeout=self._timeout,
                headers={"Authorization": f"Bearer {self._token}", "User-Agent": "isrsync"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        js: Any = None,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, bytes, Any]:
        """One request with retries; returns (status, body, headers). Raises IsrError."""
        data = json.dumps(js).encode() if js is not None else body
        hdrs = dict(headers or {})
        if js is not None:
            hdrs["Content-Type"] = "application/json"
        last: Exception | None = None
        for attempt in range(1 if self._unreachable else self._retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                async with self._sess().request(
                    method, self.url + path, data=data, headers=hdrs, params=params
                ) as resp:
                    raw = await resp.read()
                    if resp.status in TRANSIENT_STATUS:
                        last = Unreachable(f"the server answered HTTP {resp.status}")
                        continue
                    self._unreachable = False
                    if resp.status >= 400:
                        raise wire.error_from(resp.status, _maybe_json(raw))
                    return resp.status, raw, resp.headers
            except IsrError:
                raise
            except aiohttp.ClientConnectorCertificateError as e:
                raise Unreachable(
                    f"the server {self.url} presented a certificate this site does not trust ({e.certificate_error})",
                    hint="pass the server's CA with --cacert if it is yours",
                ) from None
            except aiohttp.ClientSSLError as e:
                raise Unreachable(f"TLS with {self.url} failed: {e}") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
                last = e
        self._unreachable = True
        raise Unreachable(f"cannot reach the home server at {self.url} ({_why(last)})")

    async def _json(self, method: str, path: str, js: Any = None, **kw: Any) -> Any:
        _, raw, _ = await self._call(method, path, js=js, **kw)
        try:
            return json.loads(raw)
        except ValueError:
            raise FormatError("the server sent a malformed answer") from None

    def _p(self, parcel: uuid.UUID) -> str:
        return f"{wire.API}/parcels/{parcel}"

    # -- key bundle --------------------------------------------------------------------

    async def get_key_bundle(self) -> bytes | None:
        try:
            _, raw, _ = await self._call("GET", f"{wire.API}/keybundle")
        except NotFound:
            return None
        return raw

    async def put_key_bundle(self, sealed: bytes, expect: bytes | None) -> None:
        await self._call(
            "PUT", f"{wire.API}/keybundle", body=sealed,
            headers={"If-Match": expect.hex() if expect else "*none*",
                     "Content-Type": "application/octet-stream"},
        )

    # -- parcels -------------------------------------------------------------------------

    async def create_parcel(self, parcel: uuid.UUID, name: str, hardware: str = "") -> ParcelInfo:
        d = await self._json("POST", f"{wire.API}/parcels", {"parcel": str(parcel), "name": name, "hardware": hardware})
        return wire.parcel_from(d)

    async def list_parcels(self) -> list[ParcelInfo]:
        return [wire.parcel_from(d) for d in await self._json("GET", f"{wire.API}/parcels")]

    async def parcel(self, ref: uuid.UUID | str) -> ParcelInfo:
        ref = str(ref)
        if not ref or "/" in ref or ref in (".", ".."):
            raise UsageError(f"{ref!r} is not a parcel name")
        return wire.parcel_from(await self._json("GET", f"{wire.API}/parcels/{ref}"))

    async def list_versions(self, parcel: uuid.UUID) -> list[VersionInfo]:
        return [wire.version_from(d) for d in await self._json("GET", f"{self._p(parcel)}/versions")]

    async def get_manifests(self, parcel: uuid.UUID, first: int, last: int) -> list[bytes]:
        _, raw, _ = await self._call(
            "GET", f"{self._p(parcel)}/manifests", params={"first": str(first), "last": str(last)}
        )
        return wire.unframe_blobs(raw)

    # -- packs -----------------------------------------------------------------------------

    async def put_pack(self, parcel: uuid.UUID, pack_id: bytes, path: Path) -> None:
        """Upload a pack, resuming from wherever the server's copy stops.

        Returns only once the server says the pack is verified and staged.
        """
        fd, size = await asyncio.to_thread(_open_sized, Path(path))
        try:
            await self._put_pack_fd(parcel, pack_id, fd, size)
        finally:
            os.close(fd)

    async def _put_pack_fd(self, parcel: uuid.UUID, pack_id: bytes, fd: int, size: int) -> None:
        url = f"{self._p(parcel)}/packs/{pack_id.hex()}"
        restarts = 0
        for _ in range(self._retries + 8):
            st = await self._json("GET", f"{self._p(parcel)}/uploads/{pack_id.hex()}")
            if st["complete"]:
                return
            offset = int(st["offset"])
            try:
                if offset > size:
                    raise Conflict("the server holds a longer partial upload than this pack")
                if offset == size:
                    # Every byte arrived but was never verified (a cut or a crash
                    # in between): ask the server to finish.
                    await self._call_once("POST", url, b"", {"Content-Range": f"bytes */{size}"})
                    continue
                while offset < size:
                    end = min(size, offset + UPLOAD_PIECE) - 1
                    # POST, not PUT: aiohttp silently replays an idempotent
                    # request after a cut, which would resend a whole piece.
                    await self._call_once(
                        "POST", url, _read_range(fd, offset, end + 1),
                        {"Content-Range": f"bytes {offset}-{end}/{size}",
                         "Content-Length": str(end - offset + 1),
                         "Content-Type": "application/octet-stream"},
                    )
                    offset = end + 1
            except (Unreachable, Conflict):
                await asyncio.sleep(self._backoff)
            except IntegrityError:
                # The server's partial copy was damaged and dropped: start over, once.
                restarts += 1
                if restarts > 1:
                    raise
        raise Unreachable(f"could not upload pack {pack_id.hex()[:16]} to {self.url}")

    async def _call_once(
        self, method: str, path: str, body: bytes | AsyncIterator[bytes], headers: dict[str, str]
    ) -> tuple[int, bytes, Any]:
        try:
            async with self._sess().request(method, self.url + path, data=body, headers=headers) as resp:
                raw = await resp.read()
                if resp.status in TRANSIENT_STATUS:
                    raise Unreachable(f"the server answered HTTP {resp.status}")
                if resp.status >= 400:
                    raise wire.error_from(resp.status, _maybe_json(raw))
                return resp.status, raw, resp.headers
        except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as e:
            raise Unreachable(f"upload to {self.url} was cut ({_why(e)})") from None

    async def get_pack(
        self, parcel: uuid.UUID, pack_id: bytes, offset: int = 0, length: int | None = None
    ) -> bytes:
        headers = {}
        if offset or length is not None:
            end = "" if length is None else str(offset + length - 1)
            if length == 0:
                return b""
            headers["Range"] = f"bytes={offset}-{end}"
        _, raw, _ = await self._call("GET", f"{self._p(parcel)}/packs/{pack_id.hex()}", headers=headers)
        if length is not None and len(raw) != length:
            # The server clips a range at the end of the pack, as HTTP allows.
            raise UsageError(f"range {offset}+{length} is outside the pack")
        return raw

    async def pack_size(self, parcel: uuid.UUID, pack_id: bytes) -> int | None:
        st = await self._json("GET", f"{self._p(parcel)}/uploads/{pack_id.hex()}")
        return int(st["offset"]) if st["complete"] else None

    async def put_torrent(self, parcel: uuid.UUID, pack_id: bytes, data: bytes) -> None:
        wire.check_torrent(data)
        await self._call("PUT", f"{self._p(parcel)}/packs/{pack_id.hex()}/torrent", body=data,
                         headers={"Content-Type": "application/x-bittorrent"})

    async def get_torrent(self, parcel: uuid.UUID, pack_id: bytes) -> bytes | None:
        status, raw, _ = await self._call("GET", f"{self._p(parcel)}/packs/{pack_id.hex()}/torrent")
        # 204: the pack is there but has no torrent (made before torrents were).
        return None if status == 204 else raw

    async def have_packs(self, parcel: uuid.UUID, pack_ids: Iterable[bytes]) -> set[bytes]:
        d = await self._json("POST", f"{self._p(parcel)}/have-packs", {"packs": [p.hex() for p in pack_ids]})
        return {bytes.fromhex(x) for x in d["have"]}

    async def locate(self, parcel: uuid.UUID, tags: Iterable[bytes]) -> dict[bytes, PackEntry]:
        d = await self._json("POST", f"{self._p(parcel)}/locate", {"tags": [t.hex() for t in tags]})
        out = {}
        for t, (pack, off, n) in d.items():
            tag = bytes.fromhex(t)
            out[tag] = PackEntry(tag, bytes.fromhex(pack), int(off), int(n))
        return out

    # -- lock and commit -------------------------------------------------------------------

    async def lock_status(self, parcel: uuid.UUID) -> LockState:
        return wire.lock_from(await self._json("GET", f"{self._p(parcel)}/lock"))

    async def acquire(self, parcel: uuid.UUID, holder: Holder) -> LockState:
        return wire.lock_from(await self._json("POST", f"{self._p(parcel)}/lock", {"site": holder.site, "host": holder.host}))

    async def release(self, parcel: uuid.UUID, epoch: int) -> LockState:
        return wire.lock_from(await self._json("POST", f"{self._p(parcel)}/lock/release", {"epoch": epoch}))

    async def break_lock(self, parcel: uuid.UUID, reason: str = "") -> LockState:
        return wire.lock_from(await self._json("POST", f"{self._p(parcel)}/lock/break", {"reason": reason}))

    async def hand_over(self, parcel: uuid.UUID, epoch: int, holder: Holder) -> LockState:
        return wire.lock_from(await self._json(
            "POST", f"{self._p(parcel)}/lock/hand-over", wire.hand_over_json(epoch, holder)))

    async def commit(self, parcel: uuid.UUID, req: CommitRequest) -> VersionInfo:
        _, raw, _ = await self._call(
            "POST", f"{self._p(parcel)}/commit", body=wire.encode_commit(req),
            headers={"Content-Type": "application/octet-stream"},
        )
        return wire.version_from(json.loads(raw))


def _open_sized(path: Path) -> tuple[int, int]:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return fd, os.fstat(fd).st_size
    except BaseException:
        os.close(fd)
        raise


async def _read_range(fd: int, start: int, stop: int) -> AsyncIterator[bytes]:
    """Bytes ``start`` to ``stop`` of ``fd``, READ_BLOCK at a time, read on a worker thread.

    A piece is up to UPLOAD_PIECE (64 MiB): read whole, or read on the loop,
    it would hold that much memory or stall a guest's disk served by the loop.
    """
    pos = start
    while pos < stop:
        block = await asyncio.to_thread(os.pread, fd, min(READ_BLOCK, stop - pos), pos)
        if not block:
            # Content-Length promised more: fail the request rather than let it hang.
            raise OSError(f"pack file ended at {pos}, expected {stop} bytes")
        pos += len(block)
        yield block


def _maybe_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        return None


def _why(e: BaseException | None) -> str:
    """Why a request got no answer, as a person would say it (not aiohttp's repr of its connector)."""
    if e is None:
        return "no answer"
    if isinstance(e, asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, aiohttp.ClientConnectorError):
        os_err = e.os_error
        if isinstance(os_err, socket.gaierror):
            return f"the name {e.host} does not resolve"
        # asyncio words its own strerror ("Connect call failed ('10.0.0.1', 80)"): say the errno's.
        reason = os.strerror(os_err.errno) if os_err is not None and os_err.errno else "no connection"
        return reason[:1].lower() + reason[1:]
    if isinstance(e, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(e, (aiohttp.ClientPayloadError, aiohttp.ClientResponseError)):
        return "the answer was cut short"
    if isinstance(e, ConnectionError):
        return os.strerror(e.errno).lower() if e.errno else type(e).__name__
    return str(e) or type(e).__name__
