"""What the site's operations return: typed values that cross the control socket
and reach the CLI, which only renders them.

Each has ``to_json`` (plain JSON types, for the wire and ``--json``) and
``from_json`` (checked: a reply that lacks a field is a malformed reply, not a
KeyError three layers up).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import FormatError
from .sources import SourceInfo

T = TypeVar("T")


def _build(cls: type[T], d: Any) -> T:
    if not isinstance(d, dict):
        raise FormatError(f"malformed {cls.__name__}: not an object")
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    required = {f.name for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    if not required <= d.keys():
        raise FormatError(f"malformed {cls.__name__}: missing {', '.join(sorted(required - d.keys()))}")
    return cls(**{k: v for k, v in d.items() if k in names})


class _Json:
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_json(cls: type[T], d: Any) -> T:  # type: ignore[misc]
        return _build(cls, d)


@dataclass
class ResumeReport(_Json):
    parcel: str
    version: int
    policy: str
    accel: str
    cold_boot: bool
    local_changes: bool
    seconds: dict[str, float] = field(default_factory=dict)
    fetched_before_start: int = 0
    memory: str = "none"  # how the memory image came back: lazy, eager, or none (cold boot)


@dataclass(frozen=True)
class HoardResult(_Json):
    """What one hoard of a version did, and which source served what."""

    version: int
    fetched: int  # chunks brought into the cache now
    chunks: int  # chunks the version names (all cached afterwards)
    sources: list[SourceInfo] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "fetched": self.fetched, "chunks": self.chunks,
                "sources": [dataclasses.asdict(s) for s in self.sources]}

    @classmethod
    def from_json(cls, d: Any) -> "HoardResult":
        res = _build(cls, d)
        return dataclasses.replace(res, sources=[SourceInfo.from_json(s) for s in res.sources])


@dataclass(frozen=True)
class MediumCopyResult(_Json):
    """What `suspend --to-usb` put on the medium."""

    medium: str
    published: bool  # False: the copy was dropped; the medium holds what it held before
    chunks: int
    bytes: int
    seconds: float
    missing: int = 0  # chunks the cache no longer had (the server has them)
    problem: str | None = None  # why the copy was dropped
    carries_lock: bool = False


@dataclass(frozen=True)
class SuspendResult(_Json):
    committed: bool
    memory_bytes: int
    memory_seconds: float
    memory_new_chunks: int
    memory_kept_chunks: int
    dirty_chunks: int
    memory_stored_bytes: int = 0  # the image encoded (compressed, encrypted): what crosses a link
    version: int | None = None  # when committed
    seconds: float | None = None
    kept_lock: bool = False
    reason: str | None = None  # why not committed (the server was unreachable)
    medium: MediumCopyResult | None = None  # with --to-usb

    @classmethod
    def from_json(cls, d: Any) -> "SuspendResult":
        res = _build(cls, d)
        m = d.get("medium")
        return dataclasses.replace(res, medium=MediumCopyResult.from_json(m) if m is not None else None)


@dataclass(frozen=True)
class SyncResult(_Json):
    version: int
    committed: bool = True
    paused_seconds: float | None = None  # a running guest paused this long
    seconds: float | None = None


@dataclass(frozen=True)
class PowerOffResult(_Json):
    committed: bool
    version: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class RunStatus(_Json):
    """One running parcel, as `isrsync status` shows it."""

    parcel: str
    name: str | None
    base: int | None
    policy: str
    dirty_chunks: int
    trickled_chunks: int
    residue_chunks: int
    # The guest disk's own counters (NBD requests, chunks missed and served by the cache).
    reads: int
    writes: int
    misses: int
    cache_hits: int
    qemu: str
    # Who served what: the table of `status` and `sources` and their --json are this one
    # list. Its cache row also counts boot files and guest RAM, so its hits are at least
    # ``cache_hits``; its ``bad`` are the damaged copies the cache dropped.
    sources: list[SourceInfo] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)  # the lazy restore's counters
    report: ResumeReport | None = None
    # Chunks the home server answered with bytes that failed their tag (its copy is
    # damaged: `isrsync server check` finds it), and the packs they are in (hex ids).
    damaged_from_server: int = 0
    damaged_packs: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, d: Any) -> "RunStatus":
        st = _build(cls, d)
        report = d.get("report")
        return dataclasses.replace(
            st,
            sources=[SourceInfo.from_json(s) for s in d.get("sources") or []],
            report=ResumeReport.from_json(report) if report is not None else None,
        )

    def source(self, name: str) -> SourceInfo | None:
        return next((s for s in self.sources if s.name == name), None)
