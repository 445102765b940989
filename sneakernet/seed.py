"""Plaintext seeds: a raw, ISO or qcow2 image the user has, as a lookaside source (docs/medium.md).

``seed_image`` reads the image once, encodes each 128 KiB chunk of its guest
view with the user's convergence secret and keeps (tag -> chunk number) in
``<cache>/seeds/<key>/seed.idx``. :class:`SeedSource` answers a tag by
reading that chunk's plaintext again and encoding it: the registry checks the
result against the tag like any other source's answer, so an image that
changed since it was seeded, or a bit flipped on a DVD, can only fail to help.

Nothing here writes VM state anywhere: the image is the user's own file (read,
never written), and the index holds tags, chunk numbers and the image's
extent map, no plaintext. A qcow2 image is mapped with ``qemu-img map``: only
clusters stored in the file itself, uncompressed, are served; compressed
clusters and those of a backing file are left to the other sources.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from isrsync.chunk import CHUNK_SIZE, TAG_SIZE, encode, encode_many
from isrsync.errors import FormatError, MediumError, UsageError
from isrsync.site.sources import SourceKind, WorkerSource

from . import durable
from . import seedfmt as sf
from .seedfmt import ABSENT, HOLE, Extent, ImageKind, SeedIndex

log = logging.getLogger("sneakernet.seed")

SEEDS_DIR = "seeds"
INDEX_FILE = "seed.idx"
QCOW2_MAGIC = b"QFI\xfb"
ISO_MAGIC_AT = 0x8001  # the first volume descriptor's "CD001"
# An image that changed within this long of being seeded may change again in
# the same mtime tick: the next seed reads it again instead of trusting it.
RACY_NS = 3_000_000_000
_QEMU_IMG_TIMEOUT = 120

Progress = Callable[[int, int], None]  # (guest bytes looked at, guest bytes in all)


@dataclass(frozen=True)
class ImageMap:
    """An image's guest view: its kind, size and where each byte of it lies in the file."""

    kind: ImageKind
    virtual_size: int
    extents: tuple[Extent, ...]
    backing: str | None = None


@dataclass
class SeedReport:
    """What one run of :func:`seed_image` did."""

    path: Path
    index_file: Path
    kind: ImageKind
    virtual_size: int
    chunks: int = 0  # distinct tags the seed can serve
    chunk_bytes: int = 0  # plaintext bytes those chunks cover
    zero_chunks: int = 0  # all-zero chunks: never fetched from anyone, not indexed
    absent_chunks: int = 0  # chunks not in the file as plain bytes (qcow2 compressed or backing)
    read_bytes: int = 0  # image bytes read and encoded this run
    seconds: float = 0.0
    up_to_date: bool = False  # the image had not changed: nothing was read

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["path"], d["index_file"], d["kind"] = str(self.path), str(self.index_file), self.kind.label
        return d


@dataclass(frozen=True)
class SeedInfo:
    """One seed this site knows, for `sneakernet ls`."""

    key: str
    path: str
    kind: str
    virtual_size: int
    chunks: int
    chunk_bytes: int
    seeded: float  # Unix seconds
    status: str  # "ready", "changed" (seed it again), "missing", "damaged", "other user"

    def to_json(self) -> dict:
        return dict(self.__dict__)


# -- where indexes live ---------------------------------------------------------------------


def seed_key(path: Path) -> str:
    return hashlib.blake2b(os.fsencode(path), digest_size=8).hexdigest()


def index_file(cache_dir: Path, path: Path) -> Path:
    return cache_dir / SEEDS_DIR / seed_key(path) / INDEX_FILE


def _image_path(path: str | os.PathLike[str]) -> tuple[Path, os.stat_result]:
    p = Path(path).expanduser().absolute()
    try:
        st = os.stat(p)
    except OSError as e:
        raise UsageError(f"cannot read the image {p}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{p} is not a regular file",
                         hint="name an image file (raw, ISO or qcow2); mount a DVD and name the image on it")
    return p.resolve(), st


# -- the image's guest view -----------------------------------------------------------------


def map_image(path: Path, size: int) -> ImageMap:
    """Kind, guest size and extent map of an image file."""
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(ISO_MAGIC_AT)
        iso = f.read(5) == b"CD001"
    if head == QCOW2_MAGIC:
        return _map_qcow2(path)
    kind = ImageKind.ISO if iso else ImageKind.RAW
    return ImageMap(kind, size, (Extent(0, size, 0),) if size else ())


def _qemu_img(*args: str) -> object:
    try:
        done = subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=_QEMU_IMG_TIMEOUT)
    except FileNotFoundError:
        raise UsageError("a qcow2 image needs qemu-img, which is not installed",
                         hint="install qemu-utils, or convert the image to raw") from None
    except subprocess.TimeoutExpired:
        raise MediumError(f"qemu-img {args[0]} took more than {_QEMU_IMG_TIMEOUT} s") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["failed"])[-1]
        raise UsageError(f"qemu-img cannot read the image: {why}")
    try:
        return json.loads(done.stdout)
    except ValueError:
        raise MediumError(f"qemu-img {args[0]} printed something that is not JSON") from None


def _map_qcow2(path: Path) -> ImageMap:
    info = _qemu_img("info", "--output=json", "-f", "qcow2", str(path))
    rows = _qemu_img("map", "--output=json", "-f", "qcow2", str(path))
    if not isinstance(info, dict) or not isinstance(rows, list):
        raise MediumError("qemu-img described the image in an unexpected shape")
    vsize = int(info["virtual-size"])
    backing = info.get("backing-filename")
    extents: list[Extent] = []
    for r in rows:
        start, length = int(r["start"]), int(r["length"])
        if r.get("depth", 0) == 0 and r.get("data") and "offset" in r and not r.get("compressed"):
            off = int(r["offset"])
        elif r.get("zero") or (not r.get("data") and not backing):
            off = HOLE  # reads as zeros
        else:
            off = ABSENT
        if extents and extents[-1].end == start and _joins(extents[-1], off):
            prev = extents.pop()
            extents.append(Extent(prev.start, prev.length + length, prev.offset))
        else:
            extents.append(Extent(start, length, off))
    return ImageMap(ImageKind.QCOW2, vsize, tuple(extents), backing)


def _joins(prev: Extent, off: int) -> bool:
    if not prev.in_file:
        return prev.offset == off
    return off == prev.offset + prev.length


# -- reading a chunk's plaintext ------------------------------------------------------------


def read_plain(fd: int, ix: SeedIndex | ImageMap, chunk_no: int) -> bytes | None:
    """Chunk ``chunk_no`` of the image's guest view, or None where it is absent or cut short."""
    start = chunk_no * CHUNK_SIZE
    length = max(0, min(CHUNK_SIZE, ix.virtual_size - start))
    parts: list[bytes] = []
    for p in sf.pieces_of(ix.extents, start, length):
        if p.is_absent:
            return None
        if p.is_hole:
            parts.append(bytes(p.length))
            continue
        data = os.pread(fd, p.length, p.offset)
        if len(data) != p.length:
            return None
        parts.append(data)
    return b"".join(parts)


# -- seeding ---------------------------------------------------------------------------------


def load_index(path: Path) -> SeedIndex:
    """The index at ``path``; a missing, torn or foreign file raises FormatError (or OSError)."""
    return sf.decode(path.read_bytes())


def _current(ixf: Path, image: Path, st: os.stat_result, fp: bytes) -> SeedIndex | None:
    try:
        old = load_index(ixf)
    except (OSError, FormatError):
        return None
    racy = old.created_ns - st.st_mtime_ns < RACY_NS
    same = (old.path == str(image) and old.file_size == st.st_size and old.mtime_ns == st.st_mtime_ns
            and old.secret_fingerprint == fp)
    return old if same and not racy else None


def seed_image(path: str | os.PathLike[str], cache_dir: Path, secret: bytes, progress: Progress | None = None,
               *, force: bool = False) -> SeedReport:
    """Index an image as a plaintext seed under ``secret`` (incremental: an unchanged image is not read)."""
    image, st = _image_path(path)
    ixf = index_file(cache_dir, image)
    fp = sf.fingerprint(secret)
    t0 = time.monotonic()
    old = None if force else _current(ixf, image, st, fp)
    if old is not None:
        return SeedReport(image, ixf, old.kind, old.virtual_size, len(old), old.data_bytes, up_to_date=True)
    try:
        fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UsageError(f"cannot read the image {image}: {e.strerror}") from None
    try:
        m = map_image(image, st.st_size)
        rep = SeedReport(image, ixf, m.kind, m.virtual_size)
        rows = _encode_all(fd, m, secret, rep, progress)
        after = os.fstat(fd)
    except OSError as e:
        raise MediumError(f"reading the image {image} failed: {e.strerror or e}",
                          hint="a DVD or network mount may have gone; seed it again when it is back") from None
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        raise UsageError(f"{image} changed while it was being seeded",
                         hint="seed it again once nothing writes to it (a running VM's disk is not a seed)")
    ix = sf.build(m.kind, file_size=st.st_size, mtime_ns=st.st_mtime_ns, virtual_size=m.virtual_size,
                  secret_fingerprint=fp, path=str(image), extents=m.extents, rows=rows, created_ns=time.time_ns())
    rep.chunks, rep.chunk_bytes = len(ix), ix.data_bytes
    raw = sf.encode(ix)
    where = ixf.parent
    try:
        where.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as e:
        raise durable.write_error(where, e, "the seed index", len(raw), "the site cache") from None
    durable.atomic_write(where, ixf, raw, "the seed index", "the site cache")
    rep.seconds = time.monotonic() - t0
    return rep


def _encode_all(fd: int, m: ImageMap, secret: bytes, rep: SeedReport,
                progress: Progress | None) -> list[tuple[bytes, int]]:
    nos: list[int] = []

    def plains() -> Iterator[bytes]:
        for no in sf.chunk_numbers(m.virtual_size):
            plain = read_plain(fd, m, no)
            if progress is not None:
                progress(min(m.virtual_size, (no + 1) * CHUNK_SIZE), m.virtual_size)
            if plain is None:
                rep.absent_chunks += 1
                continue
            rep.read_bytes += len(plain)
            nos.append(no)
            yield plain

    rows: list[tuple[bytes, int]] = []
    for i, enc in enumerate(encode_many(plains(), secret)):
        if enc.ref.is_zero:
            rep.zero_chunks += 1
        else:
            rows.append((enc.tag, nos[i]))
    return rows


# -- what this site knows ---------------------------------------------------------------------


def _indexes(cache_dir: Path) -> Iterator[tuple[str, Path]]:
    base = cache_dir / SEEDS_DIR
    try:
        keys = sorted(os.listdir(base))
    except OSError:
        return
    for key in keys:
        f = base / key / INDEX_FILE
        if f.is_file():
            yield key, f


def _status(ix: SeedIndex, fp: bytes | None) -> str:
    if fp is not None and ix.secret_fingerprint != fp:
        return "other user"
    try:
        st = os.stat(ix.path)
    except OSError:
        return "missing"
    return "ready" if (st.st_size, st.st_mtime_ns) == (ix.file_size, ix.mtime_ns) else "changed"


def known_seeds(cache_dir: Path, secret: bytes | None = None) -> list[SeedInfo]:
    """Every seed indexed at this site, with whether it can serve now."""
    fp = sf.fingerprint(secret) if secret is not None else None
    out = []
    for key, f in _indexes(cache_dir):
        try:
            ix = load_index(f)
        except (OSError, FormatError):
            out.append(SeedInfo(key, "?", "?", 0, 0, 0, 0.0, "damaged"))
            continue
        out.append(SeedInfo(key, ix.path, ix.kind.label, ix.virtual_size, len(ix), ix.data_bytes,
                            ix.created_ns / 1e9, _status(ix, fp)))
    return out


def forget_seed(cache_dir: Path, path: str | os.PathLike[str]) -> bool:
    """Drop the index of the image at ``path`` (which may be gone); True if there was one."""
    p = Path(path).expanduser().absolute()
    targets = {index_file(cache_dir, p)}
    if p.exists():
        targets.add(index_file(cache_dir, p.resolve()))
    gone = False
    for f in targets:
        try:
            f.unlink()
            f.parent.rmdir()
            gone = True
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UsageError(f"cannot remove the seed index {f}: {e.strerror}") from None
    return gone


def open_seeds(cache_dir: Path, secret: bytes) -> list[SeedSource]:
    """A source for each seed this site indexed under ``secret`` whose image is unchanged and present.

    A seed that cannot serve is left out with a log line, never an error: a
    DVD not in the drive must not stop a resume.
    """
    fp = sf.fingerprint(secret)
    out = []
    for _, f in _indexes(cache_dir):
        try:
            ix = load_index(f)
        except (OSError, FormatError) as e:
            log.warning("seed index %s is not used: %s", f, e)
            continue
        why = _status(ix, fp)
        if why != "ready":
            if why == "changed":
                log.warning("the seed %s changed since it was seeded: run `sneakernet seed %s` again",
                            ix.path, ix.path)
            continue
        out.append(SeedSource(ix, secret, index_path=f))
    return out


# -- the source -------------------------------------------------------------------------------


class SeedSource(WorkerSource):
    """Chunks by tag from a plaintext image, encoded on the fly under the user's secret."""

    kind = SourceKind.SEED

    def __init__(self, index: SeedIndex, secret: bytes, *, index_path: Path | None = None,
                 name: str | None = None) -> None:
        self.index = index
        self.path = Path(index.path)
        self.index_path = index_path
        self._secret = secret
        self._stamp: tuple[int, ...] | None = None
        self.name = name or f"seed:{self.path.name}:{seed_key(self.path)[:8]}"
        self._lock = threading.Lock()
        # A local image is read and encoded at disk speed: far below the server.
        WorkerSource.__init__(self, per_chunk=0.002, thread_name="sneakernet-seed")

    def _closed_error(self) -> OSError:
        return OSError(f"the seed {self.name} is closed")

    async def holds(self, tags: Sequence[bytes]) -> set[bytes]:
        return {t for t in tags if len(t) == TAG_SIZE and t in self._current_index()}

    async def manifests(self, parcel: uuid.UUID) -> dict[int, bytes]:
        return {}  # an image carries chunks only

    def _current_index(self) -> SeedIndex:
        # The index file may be rewritten (seeded again, or edited by a test
        # standing in for a lying hint): reread it when its stamp changes.
        if self.index_path is None:
            return self.index
        try:
            st = os.stat(self.index_path)
            stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
            if stamp != self._stamp:
                self.index, self._stamp = load_index(self.index_path), stamp
        except (OSError, FormatError):
            pass  # the index we have is still a hint; the image check below decides
        return self.index

    def _open(self, ix: SeedIndex) -> int:
        if self._closed:
            raise self._closed_error()
        # Opened for each request: a DVD ejected, a mount gone or an image
        # replaced is noticed at once, and a hung mount hangs this worker only.
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        if (st.st_size, st.st_mtime_ns) != (ix.file_size, ix.mtime_ns) or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise OSError(errno.ESTALE, f"the seed {self.path} changed since it was seeded; "
                                        f"run `sneakernet seed {self.path}` again")
        return fd

    def _read(self, tags: list[bytes]) -> dict[bytes, bytes]:
        with self._lock:
            ix = self._current_index()
            fd = self._open(ix)
            try:
                wanted = sorted((no, t) for t in dict.fromkeys(tags)
                                if len(t) == TAG_SIZE and (no := ix.chunk_of(t)) is not None)
                out: dict[bytes, bytes] = {}
                for no, t in wanted:  # in image order: a DVD reads fastest forwards
                    plain = read_plain(fd, ix, no)
                    if plain is None:
                        continue
                    enc = encode(plain, self._secret)
                    if enc.data:
                        out[t] = enc.data
                return out
            finally:
                os.close(fd)

    def _release(self) -> None:
        pass

