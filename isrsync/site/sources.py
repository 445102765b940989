"""Lookaside sources: the protocol every source implements (DESIGN.md, "Site").

A :class:`Source` is anything that may hold an encoded chunk by tag: the home
server, another site's cache directory, a USB medium, a LAN peer. It need not be
trusted: the registry (:mod:`.registry`) checks every answer against the tag and
asks the next source when the check fails, so a stale or hostile source can only
fail to help. Media plugins import only this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from .pacing import Priority
from .worker import WorkerSource

# WorkerSource and Priority live elsewhere but are part of this module's surface:
# media plugins import only this module.
__all__ = ["Source", "SourceKind", "SourceInfo", "SourceStats", "WorkerSource", "Priority"]


class SourceKind(str, enum.Enum):
    """What a source is; decides nothing about trust (every answer is verified)."""

    SERVER = "server"
    CACHE_DIR = "cache-dir"
    MEDIUM = "medium"
    SEED = "seed"  # a plaintext image the user has, encoded on the fly (sneakernet seed)
    PEER = "peer"
    OTHER = "other"


@runtime_checkable
class Source(Protocol):
    """Something that may hold encoded chunks by tag.

    ``name`` is unique within a registry (adding a second source of the same
    name replaces the first); ``kind`` says what it is, for people.
    """

    name: str
    kind: SourceKind

    def cost(self) -> float:
        """Estimated seconds to fetch one chunk (lower is asked first)."""

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        """Whatever of ``tags`` this source can supply (unverified bytes).

        Never raises for a missing chunk; raises only when the source as a whole
        failed (it is then skipped for this request). Must not block the event
        loop: file or socket work runs in a thread or is awaited.
        """

    async def close(self) -> None:
        """Release what the source holds open (called when it is withdrawn)."""

    # Optional: ``pack_of(tag) -> bytes | None``, the pack a source read a chunk
    # from, so that damage can be named where it is (the home server's packs);
    # ``discarded_bytes``, bytes it read that were part of no chunk asked for.


@dataclass
class SourceStats:
    hits: int = 0
    bytes: int = 0
    bad: int = 0  # answers that failed the tag check
    errors: int = 0  # requests that failed, or got no answer at all in time
    seconds: float = 0.0
    late: int = 0  # requests still coming after their deadline (slow, not failed)
    wasted: int = 0  # bytes that came and were thrown away (damaged, not asked for, or had already)

    @property
    def mean_latency(self) -> float:
        return self.seconds / self.hits if self.hits else 0.0


@dataclass(frozen=True)
class SourceInfo:
    """One row of ``isrsync sources``: a source and what it has done so far."""

    name: str
    kind: str
    cost_ms: float
    hits: int
    bytes: int
    bad: int
    errors: int
    mean_latency_ms: float
    penalty_s: float = 0.0
    late: int = 0
    wasted_bytes: int = 0  # fetched more than once, or fetched and thrown away
    rate_kib_s: float | None = None  # the measured delivery rate

    @classmethod
    def from_json(cls, d: dict) -> "SourceInfo":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
