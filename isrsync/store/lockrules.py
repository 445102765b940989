"""The rules of a parcel's lock record, as pure decisions (the contract in :mod:`.base`).

Each function takes the lock as it stands and returns the lock as it must be
after the operation, or raises the error the operation is refused with; the
backend stores the result inside its own transaction. Both backends that keep
lock records, the server's :class:`~isrsync.server.repo.Repository` and
:class:`~.memory.MemoryStore`, decide here, so the fencing they promise cannot
drift apart (store/ may not import server/, so this lives in store/).

No I/O and no reading of the clock: the caller stamps the new holder.
"""

from __future__ import annotations

import time
from dataclasses import replace

from ..errors import Conflict, LockHeld, UsageError
from .base import Holder, LockState


def acquire(lock: LockState, parcel_name: str, holder: Holder) -> LockState:
    """Compare-and-set: a free lock goes to ``holder`` under the next epoch.

    The site that already holds it gets ``lock`` back unchanged (a retried
    acquire keeps its epoch); any other site is refused with :class:`LockHeld`.
    """
    if lock.holder is not None:
        if lock.holder.site == holder.site:
            return lock
        raise lock_held(parcel_name, lock.holder)
    return replace(lock, epoch=lock.epoch + 1, holder=holder)


def release(lock: LockState, epoch: int) -> LockState:
    """The lock freed by the holder of ``epoch``; the epoch is kept."""
    if lock.holder is None and lock.epoch == epoch:
        return lock  # already released (a retried release)
    check_epoch(lock, epoch)
    return replace(lock, holder=None)


def break_lock(lock: LockState) -> LockState:
    """The lock freed and its epoch bumped, whoever held it: the old holder is fenced off."""
    return replace(lock, epoch=lock.epoch + 1, holder=None)


def hand_over(lock: LockState, parcel_name: str, epoch: int, holder: Holder) -> LockState:
    """Compare-and-set: the lock held at ``epoch`` goes to ``holder`` under ``epoch + 1``.

    The bump fences off the holder of ``epoch`` exactly as a break would, so a
    site that carried the lock away on a medium, or a second copy of that
    medium, can no longer commit or release. A retry of a hand-over that landed
    (the lock at ``epoch + 1`` with ``holder``'s site) gets ``lock`` back
    unchanged, like a retried acquire: the HTTP client repeats a request whose
    answer was lost, and that must not read as losing the race.
    """
    if not holder.site or holder.medium == "":
        raise UsageError("a lock can only be handed over to a named site or medium",
                         hint="this is a bug in the caller; nothing was changed")
    h = lock.holder
    if h is not None and h.site == holder.site and lock.epoch == epoch + 1:
        return lock
    if h is None:
        raise Conflict(
            f"cannot hand over the lock of parcel {parcel_name}: nobody holds it, it was released "
            f"or broken (the server's epoch {lock.epoch}, this site's {epoch})",
            hint="your local changes are kept at this site; nothing on the server was changed",
            details={"epoch": lock.epoch},
        )
    if lock.epoch != epoch:
        raise Conflict(
            f"cannot hand over the lock of parcel {parcel_name}: it is no longer at epoch {epoch} "
            f"but at {lock.epoch}, held by {h.describe()}",
            hint=("it was taken first (by another site or another copy of a medium); "
                  "your local changes are kept at this site, nothing on the server was changed"),
            details={"epoch": lock.epoch, "site": h.site, "host": h.host},
        )
    return replace(lock, epoch=epoch + 1, holder=holder)


def check_commit(lock: LockState, parcel_name: str, epoch: int, parent: int) -> None:
    """Refuse, with :class:`Conflict`, a commit from a stale epoch or onto a stale parent."""
    check_epoch(lock, epoch)
    if lock.version != parent:
        raise Conflict(
            f"parcel {parcel_name} is at version {lock.version}, not {parent}",
            hint="another site committed first; your local changes are kept at this site",
        )


def check_epoch(lock: LockState, epoch: int) -> None:
    """Refuse, with :class:`Conflict`, a caller whose ``epoch`` no longer holds the lock."""
    if lock.holder is not None and lock.epoch == epoch:
        return
    if lock.holder is None:
        why = "the lock is free (it was released or broken)"
    else:
        why = f"the lock is held by {lock.holder.describe()}"
    raise Conflict(
        f"this site no longer holds the lock (its epoch {epoch}, the server's {lock.epoch}): {why}",
        hint="your local changes are kept at this site; nothing on the server was changed",
        details={"epoch": lock.epoch},
    )


def lock_held(parcel_name: str, holder: Holder) -> LockHeld:
    since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(holder.since))
    details = {"site": holder.site, "host": holder.host, "user": holder.user, "since": holder.since}
    if holder.medium is not None:
        # A carried lock is not "in use" anywhere the user can suspend it: the
        # way back is through the medium.
        return LockHeld(
            f"parcel {parcel_name} was carried away on {holder.describe()} since {since}",
            hint=("resume from that medium (`isrsync resume --from-usb`), or break the lock with "
                  "`isrsync lock break` if the medium is lost"),
            details=details,
        )
    return LockHeld(f"parcel {parcel_name} is in use on {holder.describe()} since {since}", details=details)
