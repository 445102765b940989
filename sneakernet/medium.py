"""Media on disk: format one, open one, and write to one without ever breaking it.

The rule a writer keeps (a key can be pulled at any moment): data first, made
durable (file fsync, then its directory), and only then the index that lists
it, published atomically (temporary, fsync, rename, fsync of the directory).
A medium is therefore valid at every instant for everything its index lists;
a pack written but never listed is only wasted space, found by the next
`sneakernet index`. Manifests, the key bundle and lock tokens are written
after the index, so a version on a medium never names chunks it cannot find.

Writers on one medium (two suspends, a writer and `sneakernet index`)
serialize their index publication on an flock of ``.isrsync/.lock``, each
merging into the index as it is at that moment, never as it was when it began.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from isrsync import manifest as mf
from isrsync.errors import FormatError, MediumError, UsageError
from isrsync.pack import PackInfo, PackWriter, verify_stream

from . import format as fmt
from .durable import atomic_write, free_bytes, fsync_dir, locked, write_error
from .format import FileKind, FileRecord, Index, MediumHeader

log = logging.getLogger("sneakernet.medium")

DEFAULT_PACK_LIMIT = 64 << 20  # bytes per pack a writer makes from chunks


# -- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParcelVersions:
    """The versions of one parcel whose manifests a medium carries."""

    parcel: uuid.UUID
    versions: tuple[int, ...]


@dataclass(frozen=True)
class MediumUsage:
    capacity: int
    free: int


def read_index(path: Path, medium_id: uuid.UUID | None) -> tuple[Index, str | None]:
    """The index at ``path``, or an empty one and why (missing, torn, damaged, another medium's).

    ``medium_id`` None accepts any id. Never raises for a bad file: an index is
    a hint, and a bad one only means starting from nothing.
    """
    empty = fmt.empty_index(medium_id or fmt.NO_MEDIUM)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return empty, "not indexed yet"
    except OSError as e:
        return empty, f"cannot read the index: {e.strerror or e}"
    try:
        index = fmt.decode_index(raw)
    except FormatError as e:
        return empty, e.message
    if medium_id is not None and index.medium_id != medium_id:
        return empty, "the index belongs to another medium"
    return index, None


def publish_index(root: Path, path: Path, index: Index) -> None:
    """Replace the index at ``path`` atomically (temporary, fsync, rename, fsync dir)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(root, path, fmt.encode_index(index), "its index")


def index_path(root: Path, index_dir: Path | None) -> Path:
    return (index_dir if index_dir is not None else root / fmt.DIR) / fmt.INDEX_FILE


def read_header(root: Path) -> MediumHeader | None:
    """The medium's header, None if the tree has none; FormatError if it is damaged."""
    p = root / fmt.DIR / fmt.HEADER_FILE
    try:
        raw = p.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise MediumError(f"cannot read the medium header at {p}: {e.strerror or e}") from None
    try:
        return fmt.decode_header(raw)
    except FormatError as e:
        raise type(e)(f"the medium header at {p} is damaged: {e.message}") from None


class Medium:
    """An open medium: its header, its index (possibly empty) and what it carries."""

    def __init__(self, root: Path, header: MediumHeader, index: Index, index_file: Path,
                 index_problem: str | None) -> None:
        self.root = root
        self.header = header
        self.index = index
        self.index_file = index_file
        self.index_problem = index_problem  # why the index is empty, when it is not trusted

    @property
    def medium_id(self) -> uuid.UUID:
        return self.header.medium_id

    @property
    def label(self) -> str:
        return self.header.label

    @property
    def dot(self) -> Path:
        return self.root / fmt.DIR

    @property
    def chunk_bytes(self) -> int:
        """Bytes of the chunks its index lists."""
        return self.index.chunk_bytes

    def parcels(self) -> list[ParcelVersions]:
        """Parcels and versions whose manifests are on the medium (from headers: no key needed)."""
        return list_parcels(self.root)

    def read_manifest(self, parcel: uuid.UUID, version: int) -> bytes | None:
        try:
            raw = (self.root / fmt.manifest_path(parcel, version)).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MediumError(f"cannot read a manifest on the medium at {self.root}: {e.strerror or e}") from None
        h = mf.parse_header(raw)
        if (h.parcel, h.version) != (parcel, version):
            raise FormatError(f"the manifest of {parcel} version {version} on {self.root} is another one")
        return raw

    def keybundle(self) -> bytes | None:
        return self._opaque(self.dot / fmt.KEYBUNDLE_FILE)

    def lock_token(self, parcel: uuid.UUID) -> bytes | None:
        return self._opaque(self.root / fmt.lock_path(parcel))

    def _opaque(self, p: Path) -> bytes | None:
        try:
            return p.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise MediumError(f"cannot read {p}: {e.strerror or e}") from None

    def usage(self) -> MediumUsage:
        try:
            st = os.statvfs(self.root)
        except OSError:
            return MediumUsage(0, 0)
        return MediumUsage(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)

    def reload(self) -> None:
        self.index, self.index_problem = read_index(self.index_file, self.medium_id)

    def writer(self, *, pack_limit: int = DEFAULT_PACK_LIMIT) -> MediumWriter:
        return MediumWriter(self, pack_limit=pack_limit)


def list_parcels(root: Path) -> list[ParcelVersions]:
    """Parcels and versions whose manifests are under ``root/.isrsync/manifests``.

    A manifest file that is damaged, or is not the one its path names, is left out.
    """
    found: dict[uuid.UUID, list[int]] = {}
    base = root / fmt.DIR / fmt.MANIFESTS_DIR
    try:
        parcel_dirs = sorted(base.iterdir())
    except OSError:
        return []
    for d in parcel_dirs:
        try:
            names = sorted(p.name for p in d.iterdir())
        except OSError:
            continue
        for name in names:
            try:
                parcel, version = fmt.parse_manifest_name(d.name, name)
                h = mf.parse_header((d / name).read_bytes())
            except (FormatError, OSError):
                continue
            if (h.parcel, h.version) == (parcel, version):
                found.setdefault(parcel, []).append(version)
    return [ParcelVersions(p, tuple(sorted(v))) for p, v in sorted(found.items())]


def parcel_manifests(root: Path, parcel: uuid.UUID) -> dict[int, bytes]:
    """The encrypted manifests of ``parcel`` on the medium at ``root``, by version.

    Only files whose header names that parcel and version; a reader still
    checks them against the server's hash chain before it trusts one.
    """
    d = root / fmt.DIR / fmt.MANIFESTS_DIR / str(parcel)
    try:
        names = sorted(p.name for p in d.iterdir())
    except OSError:
        return {}
    out: dict[int, bytes] = {}
    for name in names:
        try:
            p, version = fmt.parse_manifest_name(d.name, name)
            raw = (d / name).read_bytes()
            h = mf.parse_header(raw)
        except (FormatError, OSError):
            continue
        if (h.parcel, h.version) == (p, version) == (parcel, version):
            out[version] = raw
    return out


def writable(root: Path) -> bool:
    """Whether the index can go on the medium itself (its .isrsync/ is writable here)."""
    dot = root / fmt.DIR
    try:
        if os.statvfs(dot).f_flag & os.ST_RDONLY:
            return False
    except OSError:
        return False
    return os.access(dot, os.W_OK)


def _as_dir(path: str | os.PathLike[str]) -> Path:
    root = Path(path).expanduser().absolute()
    if not root.is_dir():
        raise UsageError(f"{root} is not a directory", hint="name the mount point of the medium or a directory")
    return root


def open_medium(path: str | os.PathLike[str], index_dir: str | os.PathLike[str] | None = None) -> Medium:
    """Open a formatted medium; its index from ``index_dir`` when it is kept beside a read-only one."""
    root = _as_dir(path)
    header = read_header(root)
    if header is None:
        raise UsageError(f"{root} is not an isrsync medium (it has no {fmt.DIR}/{fmt.HEADER_FILE})",
                         hint="prepare it with `sneakernet format PATH`")
    where = index_path(root, Path(index_dir) if index_dir is not None else None)
    index, problem = read_index(where, header.medium_id)
    return Medium(root, header, index, where, problem)


def format_medium(path: str | os.PathLike[str], label: str = "") -> Medium:
    """Make a directory (a mounted key, say) a medium: ``.isrsync/``, a new id, an empty index."""
    root = _as_dir(path)
    existing = read_header(root)
    if existing is not None:
        raise UsageError(f"{root} is already an isrsync medium (id {existing.medium_id})",
                         hint="nothing was changed; `sneakernet index PATH` refreshes its index")
    header = fmt.new_header(label, time.time_ns())  # checks the label before anything is written
    dot = root / fmt.DIR
    try:
        for d in (dot, dot / fmt.PACKS_DIR, dot / fmt.MANIFESTS_DIR, dot / fmt.LOCKS_DIR):
            d.mkdir(exist_ok=True)
        fsync_dir(dot)
        fsync_dir(root)
    except OSError as e:
        raise write_error(root, e, "its .isrsync directory", 4096) from None
    # The header goes last: its presence is what makes the tree a medium.
    index = fmt.Index(header.medium_id, 0, header.created_ns)
    publish_index(root, dot / fmt.INDEX_FILE, index)
    atomic_write(root, dot / fmt.HEADER_FILE, fmt.encode_header(header), "its header")
    return Medium(root, header, index, dot / fmt.INDEX_FILE, None)


# -- writing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Written:
    path: str  # relative to the root
    info: PackInfo


class _Tee:
    """A reader that copies what it reads into another file (copy and verify in one pass)."""

    def __init__(self, src: BinaryIO, dst: BinaryIO) -> None:
        self.src, self.dst, self.copied = src, dst, 0

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.dst.write(data)
        self.copied += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        if (pos, whence) != (0, 0) or self.copied:
            raise ValueError("a tee only reads forward")
        return self.src.seek(0)


class MediumWriter:
    """Adds packs, manifests, a key bundle and lock tokens to a medium, then publishes.

    Packs are durable under their final name as each ``add_*`` returns;
    nothing is listed until :meth:`publish`. Manifests, the key bundle and lock
    tokens are held until then and written after the index. Use as a context
    manager: leaving without publishing removes this writer's temporaries.
    """

    def __init__(self, medium: Medium, *, pack_limit: int = DEFAULT_PACK_LIMIT) -> None:
        self.medium = medium
        self.root = medium.root
        self.pack_limit = pack_limit
        self._packs: list[_Written] = []
        self._tags: set[bytes] = set()
        self._manifests: dict[tuple[uuid.UUID, int], bytes] = {}
        self._keybundle: bytes | None = None
        self._locks: dict[uuid.UUID, bytes] = {}
        self._tmps: set[Path] = set()
        self._published = False
        self._packs_dir = medium.dot / fmt.PACKS_DIR
        try:
            self._packs_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise write_error(self.root, e, "its packs directory", 4096) from None

    def __enter__(self) -> MediumWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    @property
    def packs(self) -> list[PackInfo]:
        return [w.info for w in self._packs]

    def has(self, tag: bytes) -> bool:
        """Whether the medium's index (as opened) or this writer already holds ``tag``."""
        return tag in self._tags or tag in self.medium.index

    # -- packs ---------------------------------------------------------------------------

    def _tmp(self) -> Path:
        p = self._packs_dir / f".pack-{secrets.token_hex(8)}.tmp"
        self._tmps.add(p)
        return p

    def _place(self, tmp: Path, info: PackInfo) -> PackInfo:
        rel = fmt.pack_path(info.pack_id)
        os.replace(tmp, self.root / rel)  # same name means same bytes: replacing is harmless
        self._tmps.discard(tmp)
        fsync_dir(self._packs_dir)
        self._packs.append(_Written(rel, info))
        self._tags.update(e.tag for e in info.entries)
        return info

    def _drop(self, tmp: Path) -> None:
        with contextlib.suppress(OSError):
            tmp.unlink()
        self._tmps.discard(tmp)

    def add_pack_file(self, path: str | os.PathLike[str], expected_id: bytes | None = None) -> PackInfo:
        """Copy a pack onto the medium, verifying every chunk and its id in the same pass."""
        src = Path(path)
        size = src.stat().st_size
        if size > free_bytes(self.root):
            raise write_error(self.root, OSError(errno.ENOSPC, "no space"), f"pack {src.name[:16]}", size)
        tmp = self._tmp()
        try:
            with open(src, "rb") as f, open(tmp, "wb") as out:
                info = verify_stream(_Tee(f, out), expected_id)  # type: ignore[arg-type]
                out.flush()
                os.fsync(out.fileno())
            return self._place(tmp, info)
        except OSError as e:
            self._drop(tmp)
            raise write_error(self.root, e, f"pack {src.name[:16]}", size) from None
        except BaseException:
            self._drop(tmp)
            raise

    def add_chunks(self, chunks: Iterable[tuple[bytes, bytes]], *, skip_known: bool = True) -> list[PackInfo]:
        """Write encoded chunks (tag, ciphertext) as packs of about ``pack_limit`` bytes.

        Streams: the input may be a generator fed by a suspend. Tags are trusted
        (the encoder just made them; readers check them anyway). A tag this
        writer already wrote is skipped, and with ``skip_known`` one the
        medium's index lists too (``skip_known=False`` rewrites them, for a
        medium whose copies may be damaged). On a full medium the packs
        finished so far stay (they can still be published) and StorageFull is
        raised.
        """
        made: list[PackInfo] = []
        tmp: Path | None = None
        out: BinaryIO | None = None
        w: PackWriter | None = None
        try:
            for tag, data in chunks:
                if tag in self._tags or (skip_known and tag in self.medium.index) or (w is not None and tag in w):
                    continue
                if w is None:
                    tmp = self._tmp()
                    out = open(tmp, "wb")
                    w = PackWriter(out)
                w.add(tag, data)
                if w.size >= self.pack_limit:
                    made.append(self._finish(tmp, out, w))  # type: ignore[arg-type]
                    tmp = out = w = None
            if w is not None:
                made.append(self._finish(tmp, out, w))  # type: ignore[arg-type]
                tmp = out = w = None
            return made
        except OSError as e:
            needed = w.size if w is not None else 0
            raise write_error(self.root, e, "a pack of chunks", needed) from None
        finally:
            if out is not None:
                with contextlib.suppress(OSError):
                    out.close()
            if tmp is not None:
                self._drop(tmp)

    def _finish(self, tmp: Path, out: BinaryIO, w: PackWriter) -> PackInfo:
        info = w.finish()
        out.flush()
        os.fsync(out.fileno())
        out.close()
        return self._place(tmp, info)

    # -- manifests, key bundle, lock tokens --------------------------------------------------

    def add_manifest(self, raw: bytes) -> tuple[uuid.UUID, int]:
        """An encrypted manifest, as the server stores it; its header says whose and which."""
        h = mf.parse_header(raw)
        self._manifests[(h.parcel, h.version)] = bytes(raw)
        return h.parcel, h.version

    def set_keybundle(self, sealed: bytes) -> None:
        self._keybundle = bytes(sealed)

    def set_lock_token(self, parcel: uuid.UUID, token: bytes) -> None:
        self._locks[parcel] = bytes(token)

    # -- publishing ----------------------------------------------------------------------------

    def publish(self) -> Index:
        """List what was written, atomically; then write manifests, key bundle, lock tokens.

        Raises StorageFull (the previous index intact) when the new index does
        not fit. Returns the index now on the medium.
        """
        if self._published:
            raise ValueError("already published")
        dot = self.medium.dot
        with locked(dot, self.root):
            current, problem = read_index(self.medium.index_file, self.medium.medium_id)
            if problem and problem != "not indexed yet":
                log.warning("the index of %s was unusable (%s): `sneakernet index` rebuilds it", self.root, problem)
            new = [(self._record(w.path), [(e.tag, e.offset, e.length) for e in w.info.entries
                                           if fmt.MIN_ENCODED <= e.length <= fmt.MAX_ENCODED]) for w in self._packs]
            index = current
            if new or problem:
                index = fmt.merge_index(current, new, created_ns=time.time_ns())
                publish_index(self.root, self.medium.index_file, index)
        self.medium.index, self.medium.index_problem = index, None
        for (parcel, version), raw in sorted(self._manifests.items()):
            p = self.root / fmt.manifest_path(parcel, version)
            self._mkdir(p.parent)
            atomic_write(self.root, p, raw, f"the manifest of {parcel} version {version}")
        if self._keybundle is not None:
            atomic_write(self.root, dot / fmt.KEYBUNDLE_FILE, self._keybundle, "the key bundle")
        for parcel, token in sorted(self._locks.items()):
            p = self.root / fmt.lock_path(parcel)
            self._mkdir(p.parent)
            atomic_write(self.root, p, token, f"the lock token of {parcel}")
        self._published = True
        return index

    def _mkdir(self, d: Path) -> None:
        if d.is_dir():
            return
        try:
            d.mkdir(parents=True, exist_ok=True)
            fsync_dir(d.parent)
        except OSError as e:
            raise write_error(self.root, e, str(d.relative_to(self.root)), 4096) from None

    def _record(self, rel: str) -> FileRecord:
        try:
            st = os.stat(self.root / rel)
        except OSError as e:
            raise write_error(self.root, e, f"pack {Path(rel).name[:16]}", 0) from None
        # A pack is named by its bytes and never rewritten: size and mtime are
        # enough for a later re-index, even straight after writing it.
        return FileRecord(rel, st.st_size, st.st_mtime_ns, FileKind.PACK)

    def abort(self) -> None:
        """Remove this writer's temporaries (finished packs stay: they are valid, just unlisted)."""
        for tmp in list(self._tmps):
            self._drop(tmp)


def path_key(root: Path) -> str:
    """The name of an index kept beside ``root`` when it has no header (see known.media_dir)."""
    return fmt.path_key(os.fsencode(str(root)))
