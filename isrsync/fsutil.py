"""Small filesystem helpers shared by the store, the cache and the server.

The rule they enforce: a file appears under its final name complete and
durable, or not at all; a full disk or any other failure leaves no partial file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from .errors import CacheError, StorageFull


def fsync_dir(path: str | os.PathLike[str]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def os_error(e: OSError, what: str) -> Exception:
    """Translate an OSError into the isrsync error a user should see."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull(f"no space left while writing {what}")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return CacheError(f"cannot write {what}: {e.strerror}", hint="check its permissions")
    return CacheError(f"cannot write {what}: {e.strerror or e}")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: int = 0o600) -> Iterator[BinaryIO]:
    """Write a file through a temporary in the same directory, then rename.

    On any exception (including a full disk) the temporary is removed and the
    old file, if any, is untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            raise os_error(e, str(path)) from e
        raise


def atomic_write(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    with atomic_file(path, mode) as f:
        f.write(data)


def remove_stale_temps(directory: Path) -> int:
    """Remove temporaries left by writers that were killed mid-write."""
    n = 0
    for p in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            n += 1
    return n
