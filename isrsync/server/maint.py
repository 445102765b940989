"""Home server maintenance: garbage collection, ``check`` and ``prune``.

None of it needs a key: liveness comes from the tag references each commit
declared (``refs``), never from reading a keyring.

``prune`` is safe against a concurrent commit: it decides in one transaction,
copies live chunks into a new pack outside any transaction, and in a second
transaction drops an old pack only if every chunk of it that is live *now*
(a commit may have landed meanwhile) is reachable through another live pack.
A commit that names a chunk whose only pack was just dropped is refused with
``NotFound`` (the client uploads it again), never accepted with a dangling tag.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from ..chunk import tag_of
from ..errors import FormatError, IntegrityError
from ..manifest import NO_PARENT, manifest_hash, parse_header
from ..pack import PackWriter, verify_stream
from .repo import STAGING_GRACE, Repository

TMP_GRACE = 3600.0


def collect_garbage(repo: Repository, grace: float = STAGING_GRACE, now: float | None = None) -> int:
    """Drop staged packs no commit named within ``grace``, orphan pack files and
    stale partial uploads. Returns how many things were removed."""
    now = time.time() if now is None else now
    cutoff = now - grace
    removed = 0
    with repo._tx() as db:
        removed += db.execute(
            "DELETE FROM parcel_packs WHERE state='staged' AND since < ?", (cutoff,)
        ).rowcount
        orphans = [r[0] for r in db.execute(
            "SELECT id FROM packs WHERE added < ? AND id NOT IN (SELECT pack FROM parcel_packs)", (cutoff,)
        )]
        removed += _delete_packs(repo, db, orphans)
        # A crash between placing a file and recording it leaves a file no row
        # names; under the write lock no upload can be placing one right now.
        known = {bytes(r[0]).hex() for r in db.execute("SELECT id FROM packs")}
        for name, mtime in list(repo.packs.names()):
            if name not in known and mtime < cutoff:
                try:
                    pid = bytes.fromhex(name)
                except ValueError:
                    continue  # not a pack file's name: never ours to delete
                removed += repo.packs.delete(pid)
    if repo.partials.shared:
        removed += repo.partials.sweep(cutoff)
    uploads = repo.packs.uploads_root()
    for f in [*uploads.glob("*/*"), *uploads.glob(".*.tmp")]:
        limit = now - TMP_GRACE if f.name.endswith(".tmp") else cutoff
        if f.is_file() and _older(f, limit):
            f.unlink(missing_ok=True)
            removed += 1
    return removed


def sweep_partials(repo: Repository, idle: float, now: float | None = None) -> int:
    """Drop partial uploads whose last byte came more than ``idle`` seconds ago.

    Cheap (it lists only the uploads), so the server runs it every few minutes,
    unlike :func:`collect_garbage`, which walks every pack file.
    """
    now = time.time() if now is None else now
    return repo.partials.sweep(now - idle)


def _delete_packs(repo: Repository, db, ids: list[bytes]) -> int:
    """Delete pack rows and files inside the caller's write transaction.

    Files are unlinked while the write lock is held, so an upload of the same
    pack (which places its file under that lock too) cannot interleave.
    """
    db.executemany("DELETE FROM packs WHERE id=?", [(p,) for p in ids])
    return sum(repo.unlink_pack(p) for p in ids)


def _older(p: Path, cutoff: float) -> bool:
    try:
        return p.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


@dataclass
class CheckReport:
    packs: int = 0
    versions: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(repo: Repository, verify_packs: bool = True) -> CheckReport:
    """Verify every pack against its id and every version's references."""
    rep = CheckReport()
    for pid, size in repo._q("SELECT id, size FROM packs ORDER BY id"):
        rep.packs += 1
        path = repo.pack_path(pid)
        try:
            have = repo.packs.size(pid)
            if have is None:
                raise FileNotFoundError(path)
            if have != size:
                rep.problems.append(f"pack {pid.hex()[:16]}: size {have}, recorded {size}")
                continue
            if verify_packs:
                with repo.pack_file(pid) as local, open(local, "rb") as f:
                    info = verify_stream(f, pid)
                rows = {(t, o, n) for t, o, n in repo._q(
                    'SELECT tag, "offset", length FROM pack_entries WHERE pack=?', (pid,))}
                if rows != {(e.tag, e.offset, e.length) for e in info.entries}:
                    rep.problems.append(f"pack {pid.hex()[:16]}: index rows do not match the pack")
        except FileNotFoundError:
            rep.problems.append(f"pack {pid.hex()[:16]}: file is missing")
        except (IntegrityError, FormatError) as e:
            rep.problems.append(f"pack {pid.hex()[:16]}: {e.message}")
    # ``key`` is the row key the other tables use; ``parcel`` the id its owner knows.
    for (key, parcel, version) in repo._q("SELECT id, ext, version FROM parcels ORDER BY ext, owner"):
        rows = repo._q(
            "SELECT version, manifest, hash FROM versions WHERE parcel=? ORDER BY version", (key,)
        )
        if (rows[-1][0] if rows else 0) != version:
            rep.problems.append(f"parcel {parcel}: current version {version} is not its last version")
        prev: tuple[int, bytes] | None = None
        for v, raw, h in rows:
            rep.versions += 1
            try:
                hdr = parse_header(raw)
                if manifest_hash(raw) != h or hdr.version != v or str(hdr.parcel) != parcel:
                    rep.problems.append(f"parcel {parcel} version {v}: manifest does not match its record")
                if prev is not None and prev[0] == v - 1 and hdr.parent != prev[1]:
                    rep.problems.append(f"parcel {parcel} version {v}: parent hash breaks the chain")
                if v == 1 and hdr.parent != NO_PARENT:
                    rep.problems.append(f"parcel {parcel} version 1 names a parent")
                if rows[0][0] > hdr.keyring_base:
                    rep.problems.append(f"parcel {parcel} version {v}: its keyring base was pruned")
            except (IntegrityError, FormatError) as e:
                rep.problems.append(f"parcel {parcel} version {v}: {e.message}")
            prev = (v, h)
        dangling = repo._q(
            "SELECT COUNT(DISTINCT r.tag) FROM refs r WHERE r.parcel=? AND NOT EXISTS ("
            " SELECT 1 FROM pack_entries e JOIN parcel_packs pp ON pp.pack=e.pack AND pp.parcel=r.parcel"
            " AND pp.state='live' WHERE e.tag=r.tag)",
            (key,),
        )[0][0]
        if dangling:
            rep.problems.append(f"parcel {parcel}: {dangling} referenced chunk(s) are in no live pack")
    return rep


@dataclass
class PruneReport:
    versions_dropped: int = 0
    packs_dropped: int = 0
    packs_compacted: int = 0
    bytes_freed: int = 0
    kept_from: int = 0


def prune(
    repo: Repository, user: str, parcel: uuid.UUID, keep: int, min_live: float = 0.5
) -> PruneReport:
    """Keep the newest ``keep`` versions (and the keyring bases they need)."""
    if keep < 1:
        raise ValueError("keep must be at least 1")
    rep = PruneReport()
    with repo._tx() as db:
        p = repo._owned(db, user, parcel)[-1]
        (head,) = db.execute("SELECT version FROM parcels WHERE id=?", (p,)).fetchone()
        if head == 0:
            return rep
        oldest = max(1, head - keep + 1)
        # A kept delta needs its full-keyring base: never cut below it.
        for (raw,) in db.execute(
            "SELECT manifest FROM versions WHERE parcel=? AND version >= ?", (p, oldest)
        ).fetchall():
            oldest = min(oldest, parse_header(raw).keyring_base)
        rep.kept_from = oldest
        rep.versions_dropped = db.execute(
            "DELETE FROM versions WHERE parcel=? AND version < ?", (p, oldest)
        ).rowcount
        db.execute("DELETE FROM refs WHERE parcel=? AND last IS NOT NULL AND last < ?", (p, oldest))
        candidates = _pack_liveness(db, p)
        dead = [pid for pid, (live, total) in candidates.items() if live == 0]
        db.executemany("DELETE FROM parcel_packs WHERE parcel=? AND pack=?", [(p, d) for d in dead])
        rep.packs_dropped = len(dead)
        sparse = [pid for pid, (live, total) in candidates.items() if 0 < live < min_live * total]
    for pid in sparse:
        if _compact(repo, p, pid):
            rep.packs_compacted += 1
    rep.bytes_freed = _drop_unreferenced(repo)
    return rep


def _pack_liveness(db, p: str) -> dict[bytes, tuple[int, int]]:
    """live bytes and total chunk bytes of each live pack of a parcel."""
    out: dict[bytes, tuple[int, int]] = {}
    for pid, live, total in db.execute(
        # CAST: PostgreSQL's SUM of BIGINT is NUMERIC (a Decimal), not an int.
        "SELECT e.pack, CAST(SUM(CASE WHEN EXISTS (SELECT 1 FROM refs r WHERE r.parcel=? AND r.tag=e.tag)"
        " THEN e.length ELSE 0 END) AS BIGINT), CAST(SUM(e.length) AS BIGINT) FROM pack_entries e JOIN parcel_packs pp"
        " ON pp.pack=e.pack AND pp.parcel=? AND pp.state='live' GROUP BY e.pack",
        (p, p),
    ):
        out[pid] = (live, total)
    return out


def _compact(repo: Repository, p: str, old: bytes) -> bool:
    live = repo._q(
        'SELECT e.tag, e."offset", e.length FROM pack_entries e WHERE e.pack=? AND EXISTS'
        ' (SELECT 1 FROM refs r WHERE r.parcel=? AND r.tag=e.tag) ORDER BY e."offset"',
        (old, p),
    )
    tmp = repo.packs.uploads_root() / f".compact-{old.hex()[:16]}.tmp"
    try:
        with repo.pack_file(old) as local, open(local, "rb") as src, open(tmp, "wb") as out:
            w = PackWriter(out)
            for tag, off, n in live:
                src.seek(off)
                data = src.read(n)
                if tag_of(data) != tag:
                    return False  # damaged: leave it for `check` to report
                w.add(tag, data)
            info = w.finish()
            out.flush()
            os.fsync(out.fileno())
        repo.packs.place(info.pack_id, tmp)
    finally:
        tmp.unlink(missing_ok=True)
    now = time.time()
    with repo._tx() as db:
        db.execute("INSERT INTO packs VALUES (?,?,?) ON CONFLICT DO NOTHING", (info.pack_id, info.size, now))
        db.executemany(
            "INSERT INTO pack_entries VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
            [(info.pack_id, e.tag, e.offset, e.length) for e in info.entries],
        )
        db.execute("INSERT INTO parcel_packs VALUES (?,?, 'live', ?) ON CONFLICT DO NOTHING", (p, info.pack_id, now))
        # Re-check under the write lock: a commit since the first transaction
        # may have revived a chunk we did not copy.
        stranded = db.execute(
            "SELECT COUNT(*) FROM pack_entries e WHERE e.pack=? AND EXISTS"
            " (SELECT 1 FROM refs r WHERE r.parcel=? AND r.tag=e.tag) AND NOT EXISTS"
            " (SELECT 1 FROM pack_entries e2 JOIN parcel_packs pp ON pp.pack=e2.pack AND pp.parcel=?"
            "  AND pp.state='live' WHERE e2.tag=e.tag AND e2.pack<>e.pack)",
            (old, p, p),
        ).fetchone()[0]
        if stranded:
            return False
        db.execute("DELETE FROM parcel_packs WHERE parcel=? AND pack=?", (p, old))
    return True


def _drop_unreferenced(repo: Repository) -> int:
    """Delete packs no parcel names any more (staged ones are left to GC)."""
    with repo._tx() as db:
        gone = db.execute(
            "SELECT id, size FROM packs WHERE id NOT IN (SELECT pack FROM parcel_packs)"
        ).fetchall()
        present = [pid for pid, _ in gone if repo.packs.exists(pid)]
        _delete_packs(repo, db, [g[0] for g in gone])
    sizes = dict(gone)
    return sum(sizes[p] for p in present)
