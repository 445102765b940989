"""The media a site has seen: a small record per medium in the site cache, for `sneakernet ls`.

``<cache>/media/<key>/`` holds ``seen.json`` (what the medium was when last
seen) and, for a read-only or unformatted medium, the index kept beside it.
``<key>`` is the medium id, or a hash of the path for a tree nobody formatted.
One file per medium, each replaced atomically: two media indexed at once (a
udev storm) never write the same file. The record is a convenience: a lost or
damaged one is only a medium `ls` no longer lists.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import platformdirs

from isrsync.errors import IsrError

from . import durable
from . import format as fmt
from . import medium as md
from .indexer import IndexReport, Progress, index_tree

log = logging.getLogger("sneakernet.known")

# isrsync's own rule for its cache directory (isrsync.site.cache.default_cache_dir),
# repeated here because sneakernet may not import the site; a test keeps them equal.
ENV_CACHE = "ISRSYNC_CACHE"
MEDIA_DIR = "media"
SEEN_FILE = "seen.json"


def default_cache_dir(override: str | os.PathLike[str] | None = None) -> Path:
    """Flag beats environment beats the platform's per-user cache directory."""
    if override:
        return Path(override)
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE])
    return Path(platformdirs.user_cache_dir("isrsync"))


def media_key(root: Path, header: fmt.MediumHeader | None) -> str:
    return str(header.medium_id) if header is not None else md.path_key(root)


def media_dir(cache_dir: Path, key: str) -> Path:
    """Where a medium's record (and its index, when kept beside it) lives in the site cache."""
    return cache_dir / MEDIA_DIR / key


@dataclass(frozen=True)
class ParcelSeen:
    parcel: str
    versions: tuple[int, ...]


@dataclass(frozen=True)
class KnownMedium:
    """One medium as this site last saw it."""

    key: str
    medium_id: str | None  # None for a tree nobody formatted
    label: str
    path: str  # where it was mounted when last seen
    capacity: int  # bytes of the filesystem it is on
    free: int
    chunks: int  # chunks its index lists
    chunk_bytes: int
    parcels: tuple[ParcelSeen, ...]
    index_file: str
    index_beside: bool  # the index is in the site cache, not on the medium
    last_seen: float  # Unix seconds

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> KnownMedium:
        parcels = tuple(ParcelSeen(str(p["parcel"]), tuple(int(v) for v in p["versions"])) for p in d["parcels"])
        return cls(
            key=str(d["key"]), medium_id=None if d["medium_id"] is None else str(d["medium_id"]),
            label=str(d["label"]), path=str(d["path"]), capacity=int(d["capacity"]), free=int(d["free"]),
            chunks=int(d["chunks"]), chunk_bytes=int(d["chunk_bytes"]), parcels=parcels,
            index_file=str(d["index_file"]), index_beside=bool(d["index_beside"]), last_seen=float(d["last_seen"]),
        )


def describe(root: Path, index_file: Path, header: fmt.MediumHeader | None, *, chunks: int, chunk_bytes: int,
             parcels: list[md.ParcelVersions]) -> KnownMedium:
    """The record of a medium as it is now."""
    try:
        st = os.statvfs(root)
        capacity, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    except OSError:
        capacity = free = 0
    return KnownMedium(
        key=media_key(root, header),
        medium_id=str(header.medium_id) if header is not None else None,
        label=header.label if header is not None else "",
        path=str(root),
        capacity=capacity,
        free=free,
        chunks=chunks,
        chunk_bytes=chunk_bytes,
        parcels=tuple(ParcelSeen(str(p.parcel), p.versions) for p in parcels),
        index_file=str(index_file),
        index_beside=not index_file.is_relative_to(root / fmt.DIR),
        last_seen=time.time(),
    )


def note_seen(cache_dir: Path, rec: KnownMedium) -> None:
    d = media_dir(cache_dir, rec.key)
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise durable.write_error(cache_dir, e, "the record of a medium", 4096, "the site cache") from None
    data = json.dumps(rec.to_json(), indent=1, sort_keys=True).encode()
    durable.atomic_write(cache_dir, d / SEEN_FILE, data, "the record of a medium", "the site cache")


def index_dir_for(cache_dir: Path, root: Path, header: fmt.MediumHeader | None) -> Path | None:
    """Where the index of ``root`` goes: on the medium (None) if it is a writable medium,
    else beside it in the site cache (a read-only medium, a tree nobody formatted)."""
    if header is not None and md.writable(root):
        return None
    return media_dir(cache_dir, media_key(root, header))


@dataclass(frozen=True)
class Indexed:
    """What :func:`index_and_remember` did: the run, the record, and where the index is."""

    report: IndexReport
    medium: KnownMedium
    index_dir: Path | None  # None: on the medium; else pass it to MediumSource(index_dir=...)
    record_error: str | None  # the record could not be kept (the index is fine)


def index_and_remember(root: str | os.PathLike[str], cache_dir: Path, *, index_dir: Path | None = None,
                       progress: Progress | None = None) -> Indexed:
    """Index a medium or tree where its index belongs, and record it as seen by this site.

    The one call `sneakernet index` and a udev watcher make. The index run is
    incremental, and a medium whose files did not change is not written to.
    """
    top = Path(root).expanduser().absolute()
    header = md.read_header(top) if top.is_dir() else None
    if index_dir is None:
        index_dir = index_dir_for(cache_dir, top, header)
    report = index_tree(top, index_dir, progress=progress)
    rec = describe(top, report.index_file, header, chunks=report.chunks, chunk_bytes=report.chunk_bytes,
                   parcels=md.list_parcels(top) if header is not None else [])
    try:
        note_seen(cache_dir, rec)
        problem = None
    except IsrError as e:
        # The medium is fine whatever happens here: a site that cannot keep
        # the record only forgets the medium in `sneakernet ls`.
        problem = str(e)
    return Indexed(report, rec, index_dir, problem)


def known_media(cache_dir: Path) -> list[KnownMedium]:
    """Every medium this site has a record of, most recently seen first."""
    out: list[KnownMedium] = []
    try:
        dirs = list((cache_dir / MEDIA_DIR).iterdir())
    except OSError:
        return []
    for d in dirs:
        try:
            out.append(KnownMedium.from_json(json.loads((d / SEEN_FILE).read_bytes())))
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.info("the record in %s is unreadable: %s", d, e)
    return sorted(out, key=lambda m: -m.last_seen)
