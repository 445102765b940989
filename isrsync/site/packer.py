"""Turn plaintext streams (a disk image, a memory image) into a keyring and packs.

Streaming end to end: chunks are read, encoded on all cores and appended to the
current pack as they come, so memory holds a bounded window, never the image.
Chunks whose tags the destination already has are named in the keyring but not
packed again (``known``), which is what makes a commit send only new data.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from ..chunk import CHUNK_SIZE, ChunkRef, chunk_count, encode_many
from ..errors import IntegrityError
from ..fsutil import fsync_dir, os_error
from ..manifest import Keyring
from ..pack import PackInfo, PackWriter
from .cache import SiteCache

DEFAULT_PACK_LIMIT = 256 << 20

Progress = Callable[[int], None]  # called with plaintext bytes consumed


@dataclass
class PackedImage:
    keyring: Keyring
    packs: list[tuple[PackInfo, Path]] = field(default_factory=list)
    zero_chunks: int = 0
    reused_chunks: int = 0  # already known to the destination, or repeated in the image
    stored_bytes: int = 0  # ciphertext bytes written into packs

    @property
    def new_chunks(self) -> int:
        return sum(len(info.entries) for info, _ in self.packs)


def read_chunks(src: BinaryIO, size: int, progress: Progress | None = None) -> Iterator[bytes]:
    """Yield the plaintext chunks of the first ``size`` bytes of ``src``.

    A source shorter than ``size`` reads as zeros past its end (a sparse tail).
    """
    remaining = size
    while remaining > 0:
        want = min(CHUNK_SIZE, remaining)
        buf = src.read(want)
        if len(buf) < want:
            buf = buf + bytes(want - len(buf))
        remaining -= want
        if progress:
            progress(want)
        yield buf


class PackSink:
    """Packs encoded chunks into files under ``out_dir``, rolling over at a size limit.

    Each finished pack is renamed to its id (hex); an abandoned sink removes its
    temporary, so a failure (full disk included) leaves nothing half-written.
    """

    def __init__(self, out_dir: Path, limit: int = DEFAULT_PACK_LIMIT) -> None:
        self.out_dir = out_dir
        self.limit = limit
        self.done: list[tuple[PackInfo, Path]] = []
        self._tmp: Path | None = None
        self._file: BinaryIO | None = None
        self._writer: PackWriter | None = None
        self._tags: set[bytes] = set()  # in any pack of this sink, finished or not
        self.bytes = 0

    def add(self, tag: bytes, data: bytes) -> bool:
        """Append one encoded chunk (ciphertext under its tag)."""
        if self._writer is None:
            fd, name = tempfile.mkstemp(prefix=".pack.", suffix=".tmp", dir=self.out_dir)
            self._tmp = Path(name)
            self._file = os.fdopen(fd, "wb", buffering=1 << 20)
            self._writer = PackWriter(self._file)
        try:
            added = self._writer.add(tag, data)
        except OSError as e:
            self.abort()
            raise os_error(e, f"a pack in {self.out_dir}") from e
        if added:
            self.bytes += len(data)
            self._tags.add(tag)
        if self._writer.size >= self.limit:
            self.flush()
        return added

    def __contains__(self, tag: bytes) -> bool:
        return tag in self._tags

    def flush(self) -> None:
        """Finish the current pack (if any) and place it under its id."""
        if self._writer is None:
            return
        assert self._file is not None and self._tmp is not None
        try:
            info = self._writer.finish()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            dest = self.out_dir / info.pack_id.hex()
            os.replace(self._tmp, dest)
            fsync_dir(self.out_dir)
        except OSError as e:
            self.abort()
            raise os_error(e, f"a pack in {self.out_dir}") from e
        self.done.append((info, dest))
        self._writer = self._file = self._tmp = None

    def abort(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
        if self._tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                self._tmp.unlink()
        self._writer = self._file = self._tmp = None


def pack_chunks(
    plains: Iterable[bytes],
    secret: bytes,
    out_dir: str | os.PathLike[str],
    *,
    known: Callable[[bytes], bool] | None = None,
    limit: int = DEFAULT_PACK_LIMIT,
) -> tuple[list[ChunkRef], PackedImage]:
    """Encode a stream of plaintext chunks into refs (in order) and new packs.

    The returned PackedImage's keyring is a placeholder; callers that know the
    size build it from the refs (see :func:`pack_stream`).
    """
    out = Path(out_dir)
    result = PackedImage(Keyring(0))
    refs: list[ChunkRef] = []
    sink = PackSink(out, limit)
    try:
        for enc in encode_many(plains, secret):
            refs.append(enc.ref)
            if enc.ref.is_zero:
                result.zero_chunks += 1
                continue
            if enc.tag in sink or (known is not None and known(enc.tag)):
                result.reused_chunks += 1
                continue
            sink.add(enc.tag, enc.data)
        sink.flush()
    except BaseException:
        # The packs finished so far were made only for this call: remove them
        # too, so a failed init or commit leaves the directory as it found it.
        sink.abort()
        for _, path in sink.done:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        raise
    result.packs = sink.done
    result.stored_bytes = sink.bytes
    return refs, result


def pack_stream(
    src: BinaryIO,
    size: int,
    secret: bytes,
    out_dir: str | os.PathLike[str],
    *,
    known: Callable[[bytes], bool] | None = None,
    limit: int = DEFAULT_PACK_LIMIT,
    progress: Progress | None = None,
) -> PackedImage:
    """Encode ``size`` bytes of ``src`` into a keyring and new packs in ``out_dir``."""
    refs, result = pack_chunks(read_chunks(src, size, progress), secret, out_dir, known=known, limit=limit)
    assert len(refs) == chunk_count(size)
    result.keyring = Keyring.from_refs(size, refs)
    return result


def pack_cached(cache: SiteCache, out_dir: Path, tags: Iterable[bytes], *, strict: bool) -> list[tuple[PackInfo, Path]]:
    """Worker thread: the chunks of ``tags`` that ``cache`` holds, packed into ``out_dir``.

    ``strict``: a chunk missing from the cache raises IntegrityError (a commit
    needs it) and leaves no pack behind; otherwise it is skipped.
    """
    sink = PackSink(out_dir)
    try:
        for t in tags:
            data = cache.get(t)
            if data is None:
                if strict:
                    raise IntegrityError(
                        f"chunk {t.hex()[:16]} of the new version is missing from this site's cache",
                        hint="run `isrsync cache verify`; the local changes are kept",
                    )
                continue
            sink.add(t, data)
        sink.flush()
    except BaseException:
        sink.abort()
        raise
    return sink.done


def fd_chunks(fd: int, counter: list[int] | None = None) -> Iterator[bytes]:
    """Chunk a stream of unknown length (a pipe) into 128 KiB plaintexts."""
    buf = bytearray()
    total = 0
    while True:
        b = os.read(fd, 1 << 20)
        if not b:
            break
        total += len(b)
        buf += b
        while len(buf) >= CHUNK_SIZE:
            yield bytes(buf[:CHUNK_SIZE])
            del buf[:CHUNK_SIZE]
    if buf:
        yield bytes(buf)
    if counter is not None:
        counter.append(total)
