"""Index any tree as a medium: a USB key, a DVD or ISO mount, an NFS share, a directory.

Every regular file is looked at once: an isrsync pack (by its magic) has each
entry's ciphertext hashed, and only entries whose bytes match their tag are
indexed; a file small enough to be one encoded chunk is indexed under its
hash; anything else is remembered as "nothing here" so it is not read again.
A re-index rehashes only files whose size or mtime changed (or that changed
too close to the last index for their mtime to be trusted). Reads go through
a bounded buffer, so a multi-GiB pack or ISO never lands in memory.

The index goes on the medium (``.isrsync/index``), or, for read-only media and
trees nobody formatted, beside it in a directory the caller names (the site
cache's ``media/<id>/``). Either way it is only a hint: readers check tags.
"""

from __future__ import annotations

import logging
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isrsync.chunk import TAG_SIZE, tag_of
from isrsync.errors import FormatError, IntegrityError, MediumError, UsageError
from isrsync.pack import (
    ENTRY_HEADER_SIZE,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAGIC,
    parse_trailer,
)

from . import durable
from . import format as fmt
from . import medium as md
from .format import FileKind, FileRecord, Index

log = logging.getLogger("sneakernet.indexer")

# FAT keeps mtimes to 2 s, and a file can change again within one tick of
# being indexed: such a file is marked racy and rehashed next time.
RACY_NS = 3_000_000_000
_READ = 1 << 20
_INDEX_ROW = 44  # a pack index row: tag, u64 offset, u32 length (docs/pack.md)

Progress = Callable[[int, int], None]  # (bytes looked at so far, bytes to look at)
Entries = list[tuple[bytes, int, int]]  # (tag, offset, length)


@dataclass
class IndexReport:
    """What one run of :func:`index_tree` did."""

    root: Path
    index_file: Path
    medium_id: uuid.UUID
    files: int = 0  # regular files in the tree (those the index covers)
    kept: int = 0  # unchanged since the last index: not read again
    rehashed: int = 0  # read this time
    packs: int = 0
    chunk_files: int = 0
    chunks: int = 0  # entries in the new index
    chunk_bytes: int = 0
    hashed_bytes: int = 0  # ciphertext bytes hashed this run
    bad_entries: int = 0  # pack entries whose bytes did not match their tag
    unreadable: int = 0  # files or directories that could not be read (retried next time)
    seconds: float = 0.0
    previous_problem: str | None = None  # why the old index was not used, if it was not
    published: bool = False  # False when nothing had changed: the index was left as it was


@dataclass(frozen=True)
class _Found:
    rel: str
    size: int
    mtime_ns: int


def index_tree(
    root: str | os.PathLike[str],
    index_dir: str | os.PathLike[str] | None = None,
    *,
    progress: Progress | None = None,
    one_filesystem: bool = True,
) -> IndexReport:
    """Walk ``root`` and publish its index (on the medium, or in ``index_dir``).

    Without ``index_dir`` the tree must be a formatted medium (UsageError
    otherwise). ``one_filesystem`` keeps the walk off other mounts below the
    root, like ``find -xdev``.
    """
    t0 = time.monotonic()
    start_ns = time.time_ns()
    top = Path(root).expanduser().absolute()
    if not top.is_dir():
        raise UsageError(f"{top} is not a directory", hint="name the mount point of the medium or a directory")
    header = md.read_header(top)
    if index_dir is None and header is None:
        raise UsageError(f"{top} is not an isrsync medium, so its index cannot go on it",
                         hint="`sneakernet format PATH` makes it one; or keep the index beside it with --index-dir")
    beside = Path(index_dir).expanduser().absolute() if index_dir is not None else None
    mid = header.medium_id if header is not None else fmt.NO_MEDIUM
    where = md.index_path(top, beside)
    old, problem = md.read_index(where, mid)
    report = IndexReport(top, where, mid, previous_problem=problem)

    found = sorted(_walk(top, beside, one_filesystem, report), key=lambda f: f.rel)
    old_by_path = {f.path: i for i, f in enumerate(old.files)}
    old_entries = old.by_file()
    plan: list[tuple[_Found, int | None]] = []
    total = 0
    for f in found:
        i = old_by_path.get(f.rel)
        rec = old.files[i] if i is not None else None
        if rec is not None and (rec.size, rec.mtime_ns) == (f.size, f.mtime_ns) and not rec.racy:
            plan.append((f, i))
        else:
            plan.append((f, None))
            total += f.size

    rows: list[tuple[FileRecord, Entries]] = []
    done = 0
    for f, i in plan:
        report.files += 1
        if i is not None:
            rec = old.files[i]
            rows.append((rec, [(e.tag, e.offset, e.length) for e in old_entries.get(i, [])]))
            report.kept += 1
            _count(report, rec.kind)
            continue
        base = done

        def step(n: int, base: int = base) -> None:
            if progress is not None:
                progress(base + n, total)

        try:
            kind, entries = _scan(top / f.rel, f.size, report, step)
        except OSError as e:
            report.unreadable += 1
            log.info("cannot read %s: %s", top / f.rel, e)
            done += f.size
            continue
        done += f.size
        if progress is not None:
            progress(done, total)
        report.rehashed += 1
        _count(report, kind)
        racy = f.mtime_ns >= start_ns - RACY_NS
        rows.append((FileRecord(f.rel, f.size, f.mtime_ns, kind, fmt.FLAG_RACY if racy else 0), entries))

    if not top.is_dir():
        raise MediumError(f"the medium at {top} went away while it was being indexed",
                          hint="plug it in again and rerun `sneakernet index`; its previous index is intact")
    index, report.published = _publish(top, beside, where, mid, old, rows)
    report.chunks = len(index.entries)
    report.chunk_bytes = index.chunk_bytes
    report.seconds = time.monotonic() - t0
    return report


def _count(report: IndexReport, kind: FileKind) -> None:
    if kind == FileKind.PACK:
        report.packs += 1
    elif kind == FileKind.CHUNK:
        report.chunk_files += 1


def _publish(top: Path, beside: Path | None, where: Path, mid: uuid.UUID, old: Index,
             rows: list[tuple[FileRecord, Entries]]) -> tuple[Index, bool]:
    lock_dir = beside if beside is not None else top / fmt.DIR
    try:
        lock_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise durable.write_error(top if beside is None else lock_dir, e, "its index", 0) from None
    with durable.locked(lock_dir, top):
        # A writer may have published packs while we walked: keep what it
        # listed for files we did not see, if they are still there unchanged.
        current, _ = md.read_index(where, mid)
        seen = {r.path for r, _ in rows}
        by_file = current.by_file()
        for i, rec in enumerate(current.files):
            if rec.path in seen or rec.kind == FileKind.OTHER:
                continue
            try:
                st = os.stat(top / rec.path, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (rec.size, rec.mtime_ns):
                rows.append((rec, [(e.tag, e.offset, e.length) for e in by_file.get(i, [])]))
        index = fmt.build_index(mid, rows, generation=max(old.generation, current.generation) + 1,
                                created_ns=time.time_ns())
        if index.files == current.files and index.entries.packed() == current.entries.packed():
            # Nothing changed: a medium plugged in again is not written to.
            return current, False
        md.publish_index(top if beside is None else where.parent, where, index)
    return index, True


def _walk(top: Path, beside: Path | None, one_fs: bool, report: IndexReport) -> Iterator[_Found]:
    dev = os.stat(top).st_dev
    skip = _ident(beside) if beside is not None else None
    stack: list[tuple[Path, str]] = [(top, "")]
    while stack:
        d, rel = stack.pop()
        try:
            with os.scandir(d) as it:
                items = list(it)
        except OSError as e:
            report.unreadable += 1
            log.info("cannot list %s: %s", d, e)
            continue
        for entry in items:
            name = entry.name
            sub = f"{rel}/{name}" if rel else name
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                report.unreadable += 1
                continue
            if stat.S_ISDIR(st.st_mode):
                if one_fs and st.st_dev != dev:
                    continue
                if skip is not None and (st.st_dev, st.st_ino) == skip:
                    continue
                if rel == "" and name == fmt.DIR:
                    # Of .isrsync/ only packs/ holds chunks; the rest is the
                    # index itself, manifests and sealed tokens.
                    stack.append((Path(entry.path) / fmt.PACKS_DIR, f"{sub}/{fmt.PACKS_DIR}"))
                    continue
                stack.append((Path(entry.path), sub))
            elif stat.S_ISREG(st.st_mode):
                if name.startswith(".") and name.endswith(".tmp") and rel.startswith(fmt.DIR + "/"):
                    continue  # a writer's temporary: not data until it is renamed
                try:
                    fmt.check_path(fmt.encode_path(sub))
                except FormatError:
                    continue
                yield _Found(sub, st.st_size, st.st_mtime_ns)


def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except OSError:
        return None
    return st.st_dev, st.st_ino


# -- reading files ------------------------------------------------------------------------------


def _scan(path: Path, size: int, report: IndexReport, step: Callable[[int], None]) -> tuple[FileKind, Entries]:
    if size < fmt.MIN_ENCODED:
        return FileKind.OTHER, []
    with open(path, "rb", buffering=_READ) as f:
        if size <= fmt.MAX_ENCODED:
            data = f.read(size + 1)
            if data[: len(MAGIC)] == MAGIC:
                f.seek(0)
                return _scan_pack(f, len(data), report, step)
            if len(data) != size:
                raise OSError(f"{path} changed size while it was read")
            report.hashed_bytes += len(data)
            return FileKind.CHUNK, [(tag_of(data), 0, len(data))]
        if f.read(len(MAGIC)) != MAGIC:
            return FileKind.OTHER, []
        f.seek(0)
        return _scan_pack(f, size, report, step)


def _scan_pack(f: BinaryIO, size: int, report: IndexReport, step: Callable[[int], None]) -> tuple[FileKind, Entries]:
    rows = _trailer(f, size)
    out: Entries = []
    if rows is not None:
        for tag, off, n in sorted(rows, key=lambda r: r[1]):
            if not fmt.MIN_ENCODED <= n <= fmt.MAX_ENCODED:
                continue
            f.seek(off)
            data = f.read(n)
            report.hashed_bytes += len(data)
            if len(data) == n and tag_of(data) == tag:
                out.append((tag, off, n))
            else:
                report.bad_entries += 1
            step(off + n)
        return FileKind.PACK, out
    # No usable trailer (a copy cut short, a damaged footer): walk the entries
    # forward; only what hashes to its tag is kept, so walking into garbage is harmless.
    pos = HEADER_SIZE
    f.seek(pos)
    while pos + ENTRY_HEADER_SIZE <= size:
        head = f.read(ENTRY_HEADER_SIZE)
        if len(head) < ENTRY_HEADER_SIZE:
            break
        tag, n = head[:TAG_SIZE], int.from_bytes(head[TAG_SIZE:], "little")
        if not 1 <= n <= fmt.MAX_ENCODED + 1024:
            break
        data = f.read(n)
        report.hashed_bytes += len(data)
        if len(data) < n:
            break
        if n >= fmt.MIN_ENCODED and n <= fmt.MAX_ENCODED and tag_of(data) == tag:
            out.append((tag, pos + ENTRY_HEADER_SIZE, n))
        else:
            report.bad_entries += 1
        pos += ENTRY_HEADER_SIZE + n
        step(pos)
    return FileKind.PACK, out


def _trailer(f: BinaryIO, size: int) -> list[tuple[bytes, int, int]] | None:
    """The pack's own index rows, or None when its trailer is missing or damaged."""
    if size < HEADER_SIZE + FOOTER_SIZE:
        return None
    f.seek(size - FOOTER_SIZE)
    footer = f.read(FOOTER_SIZE)
    if len(footer) < FOOTER_SIZE:
        return None
    count = int.from_bytes(footer[8:12], "little")
    need = count * _INDEX_ROW + FOOTER_SIZE
    if need > size:
        return None
    f.seek(size - need)
    tail = f.read(need)
    try:
        return [(e.tag, e.offset, e.length) for e in parse_trailer(tail, size)]
    except (FormatError, IntegrityError, ValueError):
        return None
