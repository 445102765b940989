"""The home server's wire format, shared by the server and its client.

JSON for metadata (binary ids in lower-case hex), raw bytes for packs and
manifests, and one framing for bulk binary bodies. Errors travel as
``{"error", "hint", "kind", "details"}`` with an HTTP status chosen by class, and
the client raises the same :mod:`isrsync.errors` class the server raised, so a
site sees identical behaviour from a LocalStore and an HttpStore.
"""

from __future__ import annotations

import json
import re
import struct
import uuid
from typing import Any

from .. import errors
from ..errors import FormatError, IsrError
from .base import CommitRequest, Holder, LockState, ParcelInfo, VersionInfo

API = "/v1"
MAX_JSON = 4 << 20
MAX_COMMIT = 512 << 20
MAX_PACK = 4 << 30
MAX_BUNDLE = 1 << 20
MAX_TORRENT = 16 << 20

_STATUS: list[tuple[type[IsrError], int]] = [
    (errors.AuthError, 401),
    (errors.NotFound, 404),
    (errors.LockHeld, 423),
    (errors.Conflict, 409),
    (errors.UnsupportedEncoding, 415),
    (errors.TooManyUploads, 429),
    (errors.Busy, 503),
    (errors.RequestTimeout, 408),
    # Nobody reads this answer (the client is gone); it is for the access log,
    # where a killed client's upload is the client's doing, not a server fault.
    (errors.BodyCut, 400),
    (errors.UnsupportedVersion, 400),
    (errors.FormatError, 400),
    (errors.IntegrityError, 422),
    (errors.UsageError, 400),
    (errors.StorageFull, 507),
]


def status_for(err: IsrError) -> int:
    for cls, status in _STATUS:
        if isinstance(err, cls):
            return status
    return 500


def error_body(err: IsrError) -> dict[str, Any]:
    return {
        "error": err.message,
        "hint": err.hint,
        "kind": type(err).__name__,
        "details": err.details,
    }


def error_from(status: int, body: Any) -> IsrError:
    """Rebuild the error the server raised (falling back on the status)."""
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        cls = getattr(errors, str(body.get("kind")), None)
        if not (isinstance(cls, type) and issubclass(cls, IsrError)):
            cls = _by_status(status)
        details = body.get("details") if isinstance(body.get("details"), dict) else {}
        return cls(body["error"], hint=body.get("hint") or None, details=details)
    return _by_status(status)(f"the server answered HTTP {status}")


def _by_status(status: int) -> type[IsrError]:
    for cls, st in _STATUS:
        if st == status:
            return cls
    return errors.Unreachable if status >= 500 else errors.UsageError


def check_torrent(data: bytes) -> None:
    """The shape every Store checks before keeping a torrent: a bencoded dictionary
    of sane size. (Its hashes are the site's business: a wrong torrent only fails
    pieces in libtorrent, and chunk tags are checked above it.)"""
    if not data or len(data) > MAX_TORRENT:
        raise FormatError(f"a torrent must be 1 to {MAX_TORRENT} bytes, not {len(data)}")
    if not (data[:1] == b"d" and data[-1:] == b"e"):
        raise FormatError("a torrent must be a bencoded dictionary")


# -- values ------------------------------------------------------------------------


_HEX = re.compile(r"[0-9a-f]+")


def hexid(raw: Any, what: str = "id", size: int = 32) -> bytes:
    # fullmatch: bytes.fromhex alone would skip whitespace.
    if not isinstance(raw, str) or len(raw) != 2 * size or not _HEX.fullmatch(raw):
        raise FormatError(f"{what} must be {2 * size} lower-case hex digits")
    return bytes.fromhex(raw)


def hexids(raw: Any, what: str, limit: int = 1_000_000) -> list[bytes]:
    if not isinstance(raw, list) or len(raw) > limit:
        raise FormatError(f"{what} must be a list of at most {limit} ids")
    return [hexid(x, what) for x in raw]


def parcel_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except (ValueError, AttributeError, TypeError):
        raise FormatError(f"{str(raw)[:80]!r} is not a parcel id") from None


def holder_json(h: Holder | None) -> dict[str, Any] | None:
    return None if h is None else {"site": h.site, "host": h.host, "user": h.user, "since": h.since}


def holder_from(d: Any) -> Holder | None:
    if d is None:
        return None
    return Holder(str(d["site"]), str(d["host"]), str(d.get("user", "")), float(d.get("since", 0.0)))


def hand_over_json(epoch: int, holder: Holder) -> dict[str, Any]:
    """The body of ``POST .../lock/hand-over``: the epoch presented and the new holder
    (the server stamps the user and the time, as for an acquire)."""
    return {"epoch": epoch, "site": holder.site, "host": holder.host}


def lock_json(s: LockState) -> dict[str, Any]:
    return {
        "parcel": str(s.parcel), "epoch": s.epoch, "version": s.version,
        "holder": holder_json(s.holder), "hardware": s.hardware,
    }


def lock_from(d: dict[str, Any]) -> LockState:
    return LockState(
        uuid.UUID(d["parcel"]), int(d["epoch"]), int(d["version"]), holder_from(d["holder"]),
        str(d.get("hardware", "")),
    )


def parcel_json(p: ParcelInfo) -> dict[str, Any]:
    return {
        "parcel": str(p.parcel), "name": p.name, "created": p.created, "version": p.version,
        "lock": lock_json(p.lock), "head_hash": p.head_hash.hex(),
    }


def parcel_from(d: dict[str, Any]) -> ParcelInfo:
    return ParcelInfo(
        uuid.UUID(d["parcel"]), str(d["name"]), float(d["created"]), int(d["version"]), lock_from(d["lock"]),
        bytes.fromhex(str(d.get("head_hash") or "")),
    )


def version_json(v: VersionInfo) -> dict[str, Any]:
    return {
        "version": v.version, "time": v.time, "site": v.site, "manifest_hash": v.manifest_hash.hex(),
        "manifest_size": v.manifest_size, "new_pack_bytes": v.new_pack_bytes,
    }


def version_from(d: dict[str, Any]) -> VersionInfo:
    return VersionInfo(
        int(d["version"]), float(d["time"]), str(d["site"]), bytes.fromhex(d["manifest_hash"]),
        int(d["manifest_size"]), int(d["new_pack_bytes"]),
    )


# -- framing -----------------------------------------------------------------------

_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def frame_blobs(blobs: list[bytes]) -> bytes:
    """u64 length + bytes, repeated: for lists of manifests."""
    return b"".join(_U64.pack(len(b)) + b for b in blobs)


def unframe_blobs(raw: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(raw):
        if pos + 8 > len(raw):
            raise FormatError("framed body is truncated")
        (n,) = _U64.unpack_from(raw, pos)
        pos += 8
        if pos + n > len(raw):
            raise FormatError("framed body is truncated")
        out.append(raw[pos : pos + n])
        pos += n
    return out


def encode_commit(req: CommitRequest) -> bytes:
    """u32 meta length | meta JSON | manifest | added | removed | memory (32 bytes per tag)."""
    meta = json.dumps({
        "epoch": req.epoch, "parent": req.parent, "release": req.release, "site": req.site,
        "packs": [p.hex() for p in req.packs], "manifest": len(req.manifest),
        "added": len(req.added), "removed": len(req.removed), "memory": len(req.memory),
    }).encode()
    return b"".join([_U32.pack(len(meta)), meta, req.manifest, *req.added, *req.removed, *req.memory])


def decode_commit(raw: bytes) -> CommitRequest:
    try:
        (n,) = _U32.unpack_from(raw, 0)
        if n > MAX_JSON:
            raise ValueError
        meta = json.loads(raw[4 : 4 + n])
        pos = 4 + n
        m, a, r, k = (int(meta[x]) for x in ("manifest", "added", "removed", "memory"))
        epoch, parent = int(meta["epoch"]), int(meta["parent"])
        if not (0 <= epoch < 1 << 62 and 0 <= parent < 1 << 62):
            raise FormatError("commit epoch or parent is out of range")
        if min(m, a, r, k) < 0 or pos + m + 32 * (a + r + k) != len(raw):
            raise FormatError("commit body length does not match its header")
        manifest = raw[pos : pos + m]
        pos += m
        tags = [raw[i : i + 32] for i in range(pos, len(raw), 32)]
        return CommitRequest(
            epoch=epoch, parent=parent, manifest=manifest,
            packs=hexids(meta["packs"], "pack id", 100_000), added=tags[:a], removed=tags[a : a + r],
            memory=tags[a + r :], release=bool(meta["release"]), site=str(meta.get("site", ""))[:200],
        )
    except FormatError:
        raise
    except (ValueError, KeyError, TypeError, struct.error, RecursionError, OverflowError):
        raise FormatError("commit body is malformed") from None
