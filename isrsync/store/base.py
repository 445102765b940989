"""The Store protocol: what a site needs from a user's home (DESIGN.md, "Lock record").

One user's view of the authority for their parcels. Backends: :mod:`.http` (the
client of ``isrsync serve``) and :mod:`isrsync.server.local` (the home server's
own data directory in process: what the server runs on, and usable directly by
a site as a ``file://`` home; it lives with the server, since store/ never
imports server/). Every
backend passes one conformance suite (tests/store/conformance.py); the contract
is what this module's docstrings say.

Everything a Store holds is ciphertext or server-visible metadata: packs,
manifest bytes (a plaintext header plus an encrypted body), the pack index, the
tag references of each version, lock records and the sealed key bundle.

Contract
--------
* Parcels are visible only to their owner: another user's parcel is
  indistinguishable from one that does not exist (``NotFound``).
* ``put_pack`` verifies the pack against its id before accepting it
  (``IntegrityError`` otherwise), is idempotent, and *stages* the pack: it
  becomes part of the parcel only when a commit names it. Staged packs that no
  commit names are garbage-collected after a grace period.
* ``acquire`` is a compare-and-set: it succeeds only when nobody holds the lock
  (or the same site already does, which returns the current epoch), and every
  successful acquire from a free lock increments the epoch. It raises
  ``LockHeld`` naming the holder otherwise. ``break_lock`` increments the epoch
  and frees the lock. There is no lease timeout.
* ``hand_over`` is a compare-and-set too: it succeeds only when the lock is held
  at exactly ``epoch``, and gives it to ``holder`` under ``epoch + 1``, so the
  previous holder is fenced off as by a break. A suspend with ``--carry-lock``
  hands the lock to a medium (a :meth:`Holder.for_medium`); a site that resumes
  from that medium takes it back the same way, presenting the carried epoch. A
  stale epoch or a free lock raises ``Conflict`` and changes nothing; a retry of
  a hand-over that landed (the lock at ``epoch + 1`` with ``holder``'s site)
  returns the current state, so the call is safe to repeat.
* ``commit`` atomically checks that the lock is held with ``epoch`` (whoever
  holds it: a site that resumed from a medium commits under the carried epoch
  while the medium is the holder) and that the
  current version is ``parent``; checks the manifest header (parcel, version
  ``parent + 1``, parent hash); checks every tag the new version adds exists in
  the parcel's packs (including the ones this commit names); then stores the
  version and, if asked, releases the lock. It raises ``Conflict`` on a stale
  epoch or parent and changes nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Protocol, runtime_checkable

from ..pack import PackEntry


# A lock handed to a medium (``--carry-lock``) names it as the holder's site.
MEDIUM_SITE_PREFIX = "medium:"


@dataclass(frozen=True)
class Holder:
    """Who holds (or asks for) a lock: a site, or a medium that carries the lock."""

    site: str
    host: str
    user: str = ""
    since: float = 0.0

    @classmethod
    def for_medium(cls, medium_id: str, label: str) -> Holder:
        """The holder a ``--carry-lock`` suspend hands the lock to (``label`` shows as its host)."""
        return cls(MEDIUM_SITE_PREFIX + medium_id, label)

    @property
    def medium(self) -> str | None:
        """The medium's id when a medium carries the lock, else None."""
        return self.site[len(MEDIUM_SITE_PREFIX):] if self.site.startswith(MEDIUM_SITE_PREFIX) else None

    def describe(self) -> str:
        """Who this is, for one-line messages: a site by host and id, a medium by label and id."""
        medium = self.medium
        if medium is not None:
            return f"medium {self.host or '(no label)'} (medium id {medium})"
        return f"{self.host} (site {self.site})"


@dataclass(frozen=True)
class LockState:
    parcel: uuid.UUID
    epoch: int
    version: int  # the current committed version (0 before the first commit)
    holder: Holder | None
    hardware: str = ""


@dataclass(frozen=True)
class ParcelInfo:
    parcel: uuid.UUID
    name: str
    created: float
    version: int
    lock: LockState
    # The manifest hash of ``version`` (empty before the first): a site that
    # has the head's manifest from elsewhere (a USB key) checks it against
    # this instead of downloading it.
    head_hash: bytes = b""


@dataclass(frozen=True)
class VersionInfo:
    version: int
    time: float
    site: str
    manifest_hash: bytes
    manifest_size: int
    new_pack_bytes: int  # bytes of the packs this version brought in


@dataclass
class CommitRequest:
    """A new version. ``manifest`` is the sealed manifest (header + encrypted body).

    ``added``/``removed`` are the disk tags this version starts or stops
    referencing relative to its parent (the server keeps them so it can tell
    which chunks are live without reading a keyring); ``memory`` lists the
    memory image's tags, which are live for this version only.
    """

    epoch: int
    parent: int
    manifest: bytes
    packs: list[bytes] = field(default_factory=list)
    added: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)
    memory: list[bytes] = field(default_factory=list)
    release: bool = True
    site: str = ""


@runtime_checkable
class Store(Protocol):
    """One user's home: packs, versions, lock records and their key bundle."""

    # -- key bundle ---------------------------------------------------------------
    async def get_key_bundle(self) -> bytes | None:
        """The sealed key bundle, or None before the first put."""

    async def put_key_bundle(self, sealed: bytes, expect: bytes | None) -> None:
        """Replace the bundle if its current BLAKE2b-256 is ``expect`` (None: no
        bundle yet); ``Conflict`` otherwise, so two sites never lose an update."""

    # -- parcels and versions -----------------------------------------------------
    async def create_parcel(self, parcel: uuid.UUID, name: str, hardware: str = "") -> ParcelInfo:
        """Create an empty parcel (version 0, lock free, epoch 0). ``Conflict`` if
        this user already has a parcel of that id or name. Ids are per user:
        another user's parcel of the same id is neither seen nor touched."""

    async def list_parcels(self) -> list[ParcelInfo]:
        """This user's parcels with their lock state and last version."""

    async def parcel(self, ref: uuid.UUID | str) -> ParcelInfo:
        """A parcel by uuid or by name; ``NotFound`` otherwise."""

    async def list_versions(self, parcel: uuid.UUID) -> list[VersionInfo]:
        """Committed versions, oldest first (pruned ones are gone)."""

    async def get_manifests(self, parcel: uuid.UUID, first: int, last: int) -> list[bytes]:
        """Manifests of versions ``first..last`` inclusive, in order; ``NotFound``
        if any is missing. (Fetching a keyring chain is one call.)"""

    # -- packs ----------------------------------------------------------------------
    async def put_pack(self, parcel: uuid.UUID, pack_id: bytes, path: Path) -> None:
        """Upload and stage the pack at ``path``; verified against ``pack_id``."""

    async def get_pack(
        self, parcel: uuid.UUID, pack_id: bytes, offset: int = 0, length: int | None = None
    ) -> bytes:
        """Bytes of a committed or staged pack of the parcel (a range if asked)."""

    async def pack_size(self, parcel: uuid.UUID, pack_id: bytes) -> int | None:
        """Size of a pack the parcel can reach, or None."""

    async def put_torrent(self, parcel: uuid.UUID, pack_id: bytes, data: bytes) -> None:
        """Keep the BitTorrent v2 torrent of a pack the parcel has (staged or live),
        replacing this user's earlier one; ``NotFound`` if the parcel lacks the pack,
        ``FormatError`` unless ``data`` is a bencoded dictionary of 1 byte to
        :data:`~.wire.MAX_TORRENT`. Torrents are kept per user: another user's
        torrent of the same pack is never answered."""

    async def get_torrent(self, parcel: uuid.UUID, pack_id: bytes) -> bytes | None:
        """This user's torrent of a pack the parcel has, or None if it has none (a pack
        made before torrents were); ``NotFound`` if the parcel lacks the pack."""

    async def have_packs(self, parcel: uuid.UUID, pack_ids: Iterable[bytes]) -> set[bytes]:
        """Which of these packs the parcel has (committed or staged)."""

    async def locate(self, parcel: uuid.UUID, tags: Iterable[bytes]) -> dict[bytes, PackEntry]:
        """Where each known tag lives (committed packs only); unknown tags are absent."""

    # -- lock and commit ----------------------------------------------------------
    async def lock_status(self, parcel: uuid.UUID) -> LockState: ...

    async def acquire(self, parcel: uuid.UUID, holder: Holder) -> LockState:
        """Compare-and-set acquire; returns the new state (with its epoch)."""

    async def release(self, parcel: uuid.UUID, epoch: int) -> LockState:
        """Free the lock if ``epoch`` is current; ``Conflict`` otherwise."""

    async def break_lock(self, parcel: uuid.UUID, reason: str = "") -> LockState:
        """Free the lock and bump the epoch, fencing off the old holder."""

    async def hand_over(self, parcel: uuid.UUID, epoch: int, holder: Holder) -> LockState:
        """Give the lock held at ``epoch`` to ``holder`` under ``epoch + 1`` (compare-and-set);
        returns the new state. ``Conflict`` if the lock is free or not at ``epoch``."""

    async def commit(self, parcel: uuid.UUID, req: CommitRequest) -> VersionInfo:
        """Atomically add version ``req.parent + 1`` (see the module contract)."""

    async def close(self) -> None: ...
