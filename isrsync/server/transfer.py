"""Moving a whole repository between backends (``isrsync server export``/``import``).

A copy from one :class:`~.repo.Repository` to another, empty one: a directory
with ``store.db`` to PostgreSQL and S3, or back. Every pack is copied to a local
file on the destination's side, verified against its id there (structure, every
chunk's tag, the id hash) and only then placed; its index rows come from that
verification, not from the source's rows. The rows go in one transaction after
every pack is in place, so a damaged pack or a lost connection leaves the
destination as it was (the packs placed so far are deleted again).

Only what a front serves moves: users and token hashes, key bundles, parcels
and their lock records, versions, the pack index, staged and live packs, tag
references, torrents and the audit log. Partial uploads stay behind (clients
resume them from zero), and so do orphan pack files no row names.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import FormatError, IntegrityError, NotFound, UsageError
from ..fsutil import os_error
from ..pack import PackEntry, verify_stream
from .repo import Repository

# (table, the columns read from the source, the columns written).
# Packs and their entries go apart: they are copied and verified first.
_BEFORE_PACKS = [
    ("users", "name, token_hash, created", "name, token_hash, created"),
    ("bundles", '"user", data, hash', '"user", data, hash'),
    # A parcel from before schema 2 may have no ext: its id is the one its user knows.
    ("parcels", "id, owner, name, created, hardware, version, epoch, holder_site, holder_host, holder_user, "
     "holder_since, COALESCE(ext, id)",
     "id, owner, name, created, hardware, version, epoch, holder_site, holder_host, holder_user, "
     "holder_since, ext"),
    ("versions", "parcel, version, time, site, manifest, hash, new_pack_bytes",
     "parcel, version, time, site, manifest, hash, new_pack_bytes"),
]
_AFTER_PACKS = [
    ("parcel_packs", "parcel, pack, state, since", "parcel, pack, state, since"),
    ("refs", "parcel, tag, first, last", "parcel, tag, first, last"),
    ("torrents", "pack, owner, data", "pack, owner, data"),
]
_AUDIT = 'time, "user", parcel, event, detail'


@dataclass
class TransferReport:
    users: int = 0
    parcels: int = 0
    versions: int = 0
    packs: int = 0
    bytes: int = 0
    seconds: float = 0.0


def describe(repo: Repository) -> str:
    """Where a repository lives, for messages (never a password)."""
    from .pg import describe as pg_describe

    rows = pg_describe(repo.db.dsn) if repo.db.engine == "postgresql" else f"{repo.root}/store.db"  # type: ignore[attr-defined]
    packs = getattr(repo.packs, "where", f"{repo.root}/packs")
    return f"{rows} with packs in {packs}"


def check_empty(dst: Repository) -> None:
    if dst._q("SELECT COUNT(*) FROM users")[0][0] or dst._q("SELECT COUNT(*) FROM packs")[0][0]:
        raise UsageError(f"the destination {describe(dst)} already holds a repository",
                         hint="copy into an empty data directory or a freshly migrated database")


def copy_repository(src: Repository, dst: Repository,
                    progress: Callable[[int, int], None] | None = None) -> TransferReport:
    """Copy everything of ``src`` into the empty ``dst``; ``progress(done, total)``
    is told the pack bytes verified so far."""
    t0 = time.monotonic()
    check_empty(dst)
    packs = [(bytes(p), int(s), float(a)) for p, s, a in src._q("SELECT id, size, added FROM packs ORDER BY id")]
    rep = TransferReport(packs=len(packs))
    total = sum(s for _, s, _ in packs)
    placed: list[bytes] = []
    try:
        entries: dict[bytes, tuple[PackEntry, ...]] = {}
        for pid, size, _ in packs:
            entries[pid] = _copy_pack(src, dst, pid, size)
            placed.append(pid)
            rep.bytes += size
            if progress:
                progress(rep.bytes, total)
        with dst.db.tx() as c:
            for table, read, write in _BEFORE_PACKS:
                rows = src._q(f"SELECT {read} FROM {table}")
                _insert(c, table, write, rows)
                if table != "bundles":
                    setattr(rep, table, len(rows))
            _insert(c, "packs", "id, size, added", packs)
            for pid, es in entries.items():
                _insert(c, "pack_entries", 'pack, tag, "offset", length',
                        [(pid, e.tag, e.offset, e.length) for e in es])
            for table, read, write in _AFTER_PACKS:
                _insert(c, table, write, src._q(f"SELECT {read} FROM {table}"))
            _insert(c, "audit", _AUDIT, src._q(f"SELECT {_AUDIT} FROM audit ORDER BY {src.db.audit_order}"))
    except BaseException:
        for pid in placed:
            dst.packs.delete(pid)
        raise
    rep.seconds = time.monotonic() - t0
    return rep


def _insert(c, table: str, cols: str, rows: list) -> None:
    marks = ",".join("?" * (cols.count(",") + 1))
    c.executemany(f"INSERT INTO {table} ({cols}) VALUES ({marks})", rows)


def _copy_pack(src: Repository, dst: Repository, pid: bytes, size: int) -> tuple[PackEntry, ...]:
    """Copy one pack to the destination's side, verify it there, place it."""
    name = pid.hex()[:16]
    tmp = dst.packs.uploads_root() / f".import-{secrets.token_hex(8)}.tmp"
    try:
        try:
            with src.pack_file(pid) as path:
                shutil.copyfile(path, tmp)
        except FileNotFoundError:
            raise NotFound(f"pack {name} is missing from {describe(src)}",
                           hint="run `isrsync server check` on the source; nothing was copied") from None
        except OSError as e:
            raise os_error(e, f"pack {name}") from e
        with open(tmp, "rb+") as f:
            try:
                info = verify_stream(f, pid)
            except (IntegrityError, FormatError) as e:
                raise IntegrityError(f"pack {name} of {describe(src)} fails its check ({e.message})",
                                     hint="run `isrsync server check` on the source; nothing was copied") from None
            os.fsync(f.fileno())
        if info.size != size:
            raise IntegrityError(f"pack {name} of {describe(src)} is {info.size} bytes, its row says {size}",
                                 hint="run `isrsync server check` on the source; nothing was copied")
        dst.packs.place(pid, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    if dst.packs.size(pid) != size:
        raise IntegrityError(f"pack {name} did not arrive whole at {describe(dst)}", hint="retry the copy")
    return info.entries
