"""Durable writes to a medium (or the site cache beside it): whole or not at all.

A key can be pulled at any instant and a medium fills up: every file here is
written to a temporary, fsynced, renamed, and its directory fsynced; any
failure removes the temporary and becomes one line (StorageFull names the
free and the needed space).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from isrsync.errors import MediumError, StorageFull, UsageError

_MIB = 1 << 20
LOCK_FILE = ".lock"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        # Some filesystems (FUSE mounts, a few network ones) refuse fsync on a
        # directory; their renames are as durable as they will ever be.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def free_bytes(path: Path) -> int:
    try:
        st = os.statvfs(path)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT)


def write_error(root: Path, e: OSError, what: str, needed: int, place: str = "the medium") -> Exception:
    """The one line a failed write to a medium (or to ``place``) becomes."""
    if _full(e):
        free = free_bytes(root)
        return StorageFull(
            f"{place} at {root} is full: {free / _MIB:.0f} MiB free, {max(needed, 1) / _MIB:.0f} MiB needed "
            f"for {what}",
            hint="free some space on it or use a bigger one; everything its index already listed is intact",
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return UsageError(
            f"cannot write to {place} at {root}: {e.strerror}",
            hint="a read-only medium can still be indexed beside it: `sneakernet index PATH --index-dir DIR`",
        )
    return MediumError(f"writing {what} to {place} at {root} failed: {e.strerror or e}",
                       hint="a medium may have been pulled or be failing; its previous index is intact")


def atomic_write(root: Path, path: Path, data: bytes, what: str, place: str = "the medium") -> None:
    """``data`` at ``path`` completely and durably, or not at all."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise write_error(root, e, what, len(data), place) from None


@contextlib.contextmanager
def locked(lock_dir: Path, root: Path) -> Iterator[None]:
    """Serialize index publication among writers of one medium (or one beside directory)."""
    try:
        fd = os.open(lock_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise write_error(root, e, "its lock file", 0) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
