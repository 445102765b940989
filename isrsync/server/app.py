"""The home server's HTTP API (aiohttp) over a :class:`~isrsync.server.repo.Repository`.

Every route but ``/v1/health`` needs ``Authorization: Bearer <token>``; a user
reaches only their own parcels, and another user's parcel answers exactly like
one that does not exist. Errors are JSON (see :mod:`isrsync.store.wire`).

Pack uploads are resumable: ``PUT .../packs/{id}`` takes an optional
``Content-Range: bytes START-END/TOTAL``; the bytes land in a partial upload
(a file in ``--data``, or pieces in the bucket that every front sees, see
:mod:`.partials`) whose size ``GET .../uploads/{id}`` reports, and when the last byte arrives the
whole pack is verified against its id before it is staged. Pack downloads go
through aiohttp's file response (Range, sendfile), so the server is a BEP 19
web seed without any BitTorrent code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from ..errors import AuthError, FormatError, IsrError, NotFound, UnsupportedEncoding, UsageError
from ..fsutil import os_error
from ..store import wire
from ..store.base import Holder
from .limits import Limits, UploadSlots, body_chunks
from .ranges import stream_pack
from .repo import Repository

log = logging.getLogger("isrsync.server")
REPO: web.AppKey[Repository] = web.AppKey("repo", Repository)
INFLIGHT: web.AppKey[set] = web.AppKey("inflight", set)
UPLOAD_LOCKS: web.AppKey[dict] = web.AppKey("upload_locks", dict)
USER: web.RequestKey[str] = web.RequestKey("user", str)
ACTIVE: web.AppKey[set] = web.AppKey("active", set)
LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
SLOTS: web.AppKey[UploadSlots] = web.AppKey("slots", UploadSlots)
MAX_INT = (1 << 62) - 1
_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=lambda o: json.dumps(o, separators=(",", ":")))


def _err(e: IsrError) -> web.Response:
    return _json(wire.error_body(e), status=wire.status_for(e))


@web.middleware
async def track_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every request in progress, from its headers on, for a graceful shutdown
    that waits for bodies still arriving (aiohttp's own drops them)."""
    task = asyncio.current_task()
    active = request.app[ACTIVE]
    active.add(task)
    try:
        return await handler(request)
    finally:
        active.discard(task)


@web.middleware
async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except IsrError as e:
        return _err(e)
    except web.HTTPException as e:
        if e.status >= 400 and e.content_type != "application/json":
            reason = e.text or e.reason
            return _json({"error": reason, "hint": "", "kind": "UsageError", "details": {}}, e.status)
        raise
    except OSError as e:
        return _err(os_error(e, "server storage"))  # type: ignore[arg-type]


@web.middleware
async def encoding_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No request body is ever decompressed (the runner is made with
    ``auto_decompress=False``): an encoded one is refused before it is read."""
    enc = request.headers.get("Content-Encoding", "").strip()
    if enc and enc.lower() != "identity":
        raise UnsupportedEncoding(f"request bodies with Content-Encoding: {enc[:40]!r} are not accepted")
    return await handler(request)


@web.middleware
async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path == f"{wire.API}/health":
        return await handler(request)
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer ") or len(header) > 512 or not header.isascii():
        raise AuthError("missing or malformed bearer token")
    repo = request.app[REPO]
    request[USER] = await _db(request, repo.authenticate, header[7:].strip())
    return await handler(request)


async def _db(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    # SQLite calls are short but blocking: keep them off the event loop.
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def _part(request: web.Request, fn: Callable[..., Any], *args: Any) -> Any:
    """Partial-upload bookkeeping. For the directory it runs in the loop, as it
    always did (cheap stat calls), so that trimming the user's partials and
    creating a new one cannot interleave with another handler's and overshoot
    the bound; for the shared backend (database, bucket) on a worker thread."""
    if request.app[REPO].partials.shared:
        return await _db(request, fn, *args)
    return fn(*args)


def _parcel(request: web.Request) -> uuid.UUID:
    return wire.parcel_id(request.match_info["parcel"])


def _pack(request: web.Request) -> bytes:
    return wire.hexid(request.match_info["pack"], "pack id")


async def _body_json(request: web.Request, limit: int = wire.MAX_JSON) -> Any:
    raw = await _read_limited(request, limit)
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise FormatError("request body is not valid JSON") from None


async def _read_limited(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise UsageError(f"request body of {request.content_length} bytes exceeds {limit}")
    buf = bytearray()
    async for part in body_chunks(request, 1 << 16, request.app[LIMITS].body_timeout):
        buf += part
        if len(buf) > limit:
            raise UsageError(f"request body exceeds {limit} bytes")
    return bytes(buf)


def _field(obj: Any, name: str, kind: type, default: Any = ...) -> Any:
    if not isinstance(obj, dict):
        raise FormatError("request body must be a JSON object")
    if name not in obj:
        if default is ...:
            raise FormatError(f"request body lacks {name!r}")
        return default
    val = obj[name]
    if kind is int and isinstance(val, bool) or not isinstance(val, kind):
        raise FormatError(f"{name!r} must be {kind.__name__}")
    if isinstance(val, int) and not 0 <= val <= MAX_INT:
        raise FormatError(f"{name!r} is out of range")
    if isinstance(val, str):
        try:
            val.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(f"{name!r} is not valid UTF-8 text") from None
    return val


# -- handlers ------------------------------------------------------------------------


async def health(request: web.Request) -> web.Response:
    from .. import __version__

    return _json({"ok": True, "version": __version__, "api": 1})


async def get_bundle(request: web.Request) -> web.Response:
    data = await _db(request, request.app[REPO].get_key_bundle, request[USER])
    if data is None:
        raise NotFound("no key bundle on the server yet")
    return web.Response(body=data, content_type="application/octet-stream")


async def put_bundle(request: web.Request) -> web.Response:
    expect_raw = request.headers.get("If-Match")
    expect = None if expect_raw in (None, "*none*") else wire.hexid(expect_raw, "If-Match")
    data = await _read_limited(request, wire.MAX_BUNDLE)
    if not data:
        raise FormatError("key bundle is empty")
    await _db(request, request.app[REPO].put_key_bundle, request[USER], data, expect)
    return _json({"ok": True})


async def create_parcel(request: web.Request) -> web.Response:
    body = await _body_json(request)
    pid = wire.parcel_id(_field(body, "parcel", str))
    info = await _db(
        request, request.app[REPO].create_parcel, request[USER], pid,
        _field(body, "name", str), _field(body, "hardware", str, "")[:4096],
    )
    return _json(wire.parcel_json(info), 201)


async def list_parcels(request: web.Request) -> web.Response:
    infos = await _db(request, request.app[REPO].list_parcels, request[USER])
    return _json([wire.parcel_json(i) for i in infos])


async def get_parcel(request: web.Request) -> web.Response:
    ref = request.match_info["parcel"]
    info = await _db(request, request.app[REPO].parcel, request[USER], ref[:200])
    return _json(wire.parcel_json(info))


async def list_versions(request: web.Request) -> web.Response:
    vs = await _db(request, request.app[REPO].list_versions, request[USER], _parcel(request))
    return _json([wire.version_json(v) for v in vs])


async def get_manifests(request: web.Request) -> web.Response:
    try:
        first, last = int(request.query["first"]), int(request.query["last"])
        if max(abs(first), abs(last)) > MAX_INT:
            raise ValueError
    except (KeyError, ValueError):
        raise FormatError("first and last must be version numbers") from None
    blobs = await _db(request, request.app[REPO].get_manifests, request[USER], _parcel(request), first, last)
    return web.Response(body=wire.frame_blobs(blobs), content_type="application/octet-stream")


async def upload_offset(request: web.Request) -> web.Response:
    repo = request.app[REPO]
    pid, pack = _parcel(request), _pack(request)
    await _db(request, repo.parcel, request[USER], pid)
    size = await _db(request, repo.reachable_pack, request[USER], pid, pack)
    if size is not None:
        return _json({"complete": True, "offset": size})
    return _json({"complete": False, "offset": await _part(request, repo.partials.offset, request[USER], pack)})


async def put_pack(request: web.Request) -> web.Response:
    repo = request.app[REPO]
    user, pid, pack = request[USER], _parcel(request), _pack(request)
    await _db(request, repo.parcel, user, pid)
    # One upload of a given pack per user at a time: two handlers appending to
    # one partial file would interleave their bytes.
    with request.app[SLOTS].take(user):
        lock = request.app[UPLOAD_LOCKS].setdefault((user, pack), asyncio.Lock())
        async with lock:
            try:
                return await _put_pack_locked(request, repo, user, pid, pack)
            finally:
                if not lock._waiters:  # type: ignore[attr-defined]
                    request.app[UPLOAD_LOCKS].pop((user, pack), None)


async def _put_pack_locked(request: web.Request, repo: Repository, user: str, pid: uuid.UUID, pack: bytes) -> web.Response:
    if await _db(request, repo.reachable_pack, user, pid, pack) is not None:
        await _drain(request)
        return _json({"complete": True}, 200)
    start, end, total = 0, -1, request.content_length
    cr = request.headers.get("Content-Range")
    partials = repo.partials
    if cr and cr.startswith("bytes */"):
        # "Finish": every byte is here (an earlier request was cut between its
        # last byte and the verification); verify and stage now.
        try:
            total = int(cr[8:])
            if not 1 <= total <= wire.MAX_PACK:
                raise ValueError
        except ValueError:
            raise FormatError("Content-Range must be 'bytes */TOTAL' with a sane TOTAL") from None
        have = await _part(request, partials.offset, user, pack)
        if have != total:
            return _json({"complete": False, "offset": have}, 202)
        return await _adopt(request, repo, user, pid, pack)
    if cr:
        m = _RANGE.match(cr)
        if not m:
            raise FormatError("Content-Range must be 'bytes START-END/TOTAL'")
        start, end, total = (int(x) for x in m.groups())
        if end < start or end >= total or (
            request.content_length is not None and request.content_length != end - start + 1
        ):
            raise FormatError("Content-Range does not match the body")
    if total is None:
        raise UsageError("a pack upload needs Content-Length or Content-Range")
    if total > wire.MAX_PACK or total < 1:
        raise UsageError(f"a pack of {total} bytes is out of range")
    have = await _part(request, partials.offset, user, pack)
    if start != have:
        # The client must continue where the server is; tell it where.
        return _json(
            {"error": f"upload is at offset {have}, not {start}", "hint": "resume from the offset",
             "kind": "Conflict", "details": {"offset": have}}, 409,
        )
    if not have:
        await _make_room(request, repo, user)
    # The bytes this body must carry: its range, or the whole pack.
    expect = end - start + 1 if cr else total
    recv = await _part(request, partials.receiving, user, pack, have)
    try:
        await _receive(request, recv.path, recv.base, expect)
    except UsageError:
        await _part(request, partials.discard, recv)
        raise
    except Exception:
        # Cut or stalled: keep what arrived, so the client resumes from there
        # (on any front, when the partials are shared).
        await _part(request, partials.keep, user, pack, have, recv)
        raise
    written = await _part(request, partials.keep, user, pack, have, recv)
    if written < total:
        return _json({"complete": False, "offset": written}, 202)
    return await _adopt(request, repo, user, pid, pack)


async def _receive(request: web.Request, part: Path, have: int, expect: int) -> int:
    """Append the body to ``part`` (``have`` bytes long); returns its new size.

    A body that ends (by its own framing) longer or shorter than ``expect`` is
    refused and none of it is kept. One that is cut or stalls keeps what
    arrived: the client resumes from there.
    """
    got = 0
    try:
        with open(part, "ab") as f:
            try:
                async for data in body_chunks(request, 1 << 20, request.app[LIMITS].body_timeout):
                    if got + len(data) > expect:
                        raise UsageError(f"the body is longer than the {expect} bytes its "
                                         "Content-Range/Content-Length declares")
                    f.write(data)
                    got += len(data)
                if got < expect:
                    raise UsageError(f"the body ended after {got} of the {expect} bytes its "
                                     "Content-Range/Content-Length declares")
            except UsageError:
                f.truncate(have)
                raise
    except OSError as e:
        raise os_error(e, "an upload") from e
    return have + got


async def _make_room(request: web.Request, repo: Repository, user: str) -> None:
    """A new partial upload: keep the user's count of partials under the bound."""
    busy = {p for (u, p) in request.app[UPLOAD_LOCKS] if u == user}
    n = await _part(request, repo.partials.trim, user, request.app[LIMITS].partials_per_user, busy)
    if n:
        log.info("dropped %d untouched partial upload(s) of %s to make room", n, user)


async def _adopt(request: web.Request, repo: Repository, user: str, pid: uuid.UUID, pack: bytes) -> web.Response:
    request.app[INFLIGHT].add(asyncio.current_task())
    try:
        # Verification hashes the whole pack: do it off the loop.
        size = await asyncio.get_running_loop().run_in_executor(
            None, repo.adopt_upload, user, pid, pack
        )
    finally:
        request.app[INFLIGHT].discard(asyncio.current_task())
    return _json({"complete": True, "size": size}, 201)


async def _drain(request: web.Request) -> None:
    async for _ in body_chunks(request, 1 << 20, request.app[LIMITS].body_timeout):
        pass


async def get_pack(request: web.Request) -> web.StreamResponse:
    repo = request.app[REPO]
    user, pid, pack = request[USER], _parcel(request), _pack(request)
    size = await _db(request, repo.reachable_pack, user, pid, pack)
    if size is None:
        raise NotFound(f"no pack {pack.hex()[:16]} in parcel {pid}")
    if not repo.packs.local:
        return await stream_pack(request, repo.packs, pack, size)
    return web.FileResponse(repo.pack_path(pack), headers={"Content-Type": "application/octet-stream"})


async def put_torrent(request: web.Request) -> web.Response:
    data = await _read_limited(request, wire.MAX_TORRENT)
    wire.check_torrent(data)
    await _db(request, request.app[REPO].put_torrent, request[USER], _parcel(request), _pack(request), data)
    return _json({"ok": True})


async def get_torrent(request: web.Request) -> web.Response:
    data = await _db(request, request.app[REPO].get_torrent, request[USER], _parcel(request), _pack(request))
    if data is None:
        return web.Response(status=204)  # an older pack: it has no torrent, which is no error
    return web.Response(body=data, content_type="application/x-bittorrent")


async def have_packs(request: web.Request) -> web.Response:
    body = await _body_json(request)
    ids = wire.hexids(_field(body, "packs", list), "pack id", 100_000)
    have = await _db(request, request.app[REPO].have_packs, request[USER], _parcel(request), ids)
    return _json({"have": sorted(p.hex() for p in have)})


async def locate(request: web.Request) -> web.Response:
    body = await _body_json(request, 64 << 20)
    tags = wire.hexids(_field(body, "tags", list), "tag", 1_000_000)
    found = await _db(request, request.app[REPO].locate, request[USER], _parcel(request), tags)
    return _json({t.hex(): [e.pack_id.hex(), e.offset, e.length] for t, e in found.items()})


async def lock_status(request: web.Request) -> web.Response:
    s = await _db(request, request.app[REPO].lock_status, request[USER], _parcel(request))
    return _json(wire.lock_json(s))


async def acquire(request: web.Request) -> web.Response:
    body = await _body_json(request)
    holder = Holder(_field(body, "site", str)[:200], _field(body, "host", str)[:200], request[USER])
    s = await _db(request, request.app[REPO].acquire, request[USER], _parcel(request), holder)
    return _json(wire.lock_json(s))


async def release(request: web.Request) -> web.Response:
    body = await _body_json(request)
    s = await _db(request, request.app[REPO].release, request[USER], _parcel(request), _field(body, "epoch", int))
    return _json(wire.lock_json(s))


async def break_lock(request: web.Request) -> web.Response:
    body = await _body_json(request)
    s = await _db(
        request, request.app[REPO].break_lock, request[USER], _parcel(request),
        _field(body, "reason", str, "")[:500],
    )
    log.warning("lock broken", extra={"user": request[USER], "parcel": str(s.parcel), "epoch": s.epoch})
    return _json(wire.lock_json(s))


async def hand_over(request: web.Request) -> web.Response:
    body = await _body_json(request)
    epoch = _field(body, "epoch", int)
    holder = Holder(_field(body, "site", str)[:200], _field(body, "host", str)[:200], request[USER])
    s = await _db(request, request.app[REPO].hand_over, request[USER], _parcel(request), epoch, holder)
    return _json(wire.lock_json(s))


async def commit(request: web.Request) -> web.Response:
    req = wire.decode_commit(await _read_limited(request, wire.MAX_COMMIT))
    request.app[INFLIGHT].add(asyncio.current_task())
    try:
        v = await _db(request, request.app[REPO].commit, request[USER], _parcel(request), req)
    finally:
        request.app[INFLIGHT].discard(asyncio.current_task())
    return _json(wire.version_json(v), 201)


def make_app(repo: Repository, limits: Limits | None = None) -> web.Application:
    app = web.Application(middlewares=[track_mw, errors_mw, encoding_mw, auth_mw], client_max_size=wire.MAX_JSON)
    app[ACTIVE] = set()
    app[LIMITS] = limits = limits or Limits()
    app[SLOTS] = UploadSlots(limits.uploads_per_user)
    app[REPO] = repo
    app[INFLIGHT] = set()
    app[UPLOAD_LOCKS] = {}
    p = f"{wire.API}/parcels/{{parcel}}"
    app.add_routes([
        web.get(f"{wire.API}/health", health),
        web.get(f"{wire.API}/keybundle", get_bundle),
        web.put(f"{wire.API}/keybundle", put_bundle),
        web.post(f"{wire.API}/parcels", create_parcel),
        web.get(f"{wire.API}/parcels", list_parcels),
        web.get(p, get_parcel),
        web.get(f"{p}/versions", list_versions),
        web.get(f"{p}/manifests", get_manifests),
        web.get(f"{p}/uploads/{{pack}}", upload_offset),
        web.put(f"{p}/packs/{{pack}}", put_pack),
        web.post(f"{p}/packs/{{pack}}", put_pack),
        web.get(f"{p}/packs/{{pack}}", get_pack),
        web.put(f"{p}/packs/{{pack}}/torrent", put_torrent),
        web.get(f"{p}/packs/{{pack}}/torrent", get_torrent),
        web.post(f"{p}/have-packs", have_packs),
        web.post(f"{p}/locate", locate),
        web.get(f"{p}/lock", lock_status),
        web.post(f"{p}/lock", acquire),
        web.post(f"{p}/lock/release", release),
        web.post(f"{p}/lock/break", break_lock),
        web.post(f"{p}/lock/hand-over", hand_over),
        web.post(f"{p}/commit", commit),
    ])
    app.on_shutdown.append(_finish_inflight)
    return app


async def _finish_inflight(app: web.Application) -> None:
    """Graceful shutdown: commits and pack adoptions under way run to the end."""
    pending = [t for t in app[INFLIGHT] if not t.done()]
    if pending:
        log.info("waiting for %d in-flight commit(s)", len(pending))
        await asyncio.wait(pending, timeout=120)


def _sent(request: web.BaseRequest, response: web.StreamResponse) -> int:
    # A pack read goes out by sendfile(2), which aiohttp's body_length never
    # counts: the length it declared is what it sent (a client that hung up
    # early is the exception, and is rare enough for an access log).
    declared = response.content_length
    if request.method == "HEAD" or declared is None:
        return response.body_length
    return max(response.body_length, declared)


class JsonAccessLogger(AbstractAccessLogger):
    """One JSON object per request: for log shippers and for reading by eye."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, elapsed: float) -> None:
        self.logger.info(json.dumps({
            "time": round(time.time(), 3),
            "remote": request.remote,
            "user": request.get(USER),
            "method": request.method,
            "path": request.path[:300],
            "status": response.status,
            "bytes": _sent(request, response),
            "ms": round(elapsed * 1000, 2),
        }, separators=(",", ":")))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


def default_data_dir() -> Path:
    return Path(os.environ.get("ISRSYNC_SERVER_DATA", "/var/lib/isrsync"))
