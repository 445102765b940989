"""Taking a parcel off a medium that carries its lock (`isrsync resume --from-usb`).

A suspend with `--to-usb --carry-lock` left on the medium: the encrypted
manifests of the version, its chunks (all of them with `--full`), the sealed key
bundle with the server's address and the user's name, and a lock token sealed
under the parcel key that names the epoch the server handed the medium. Here:

1. the keys: this site's unlocked session, or the passphrase opening the
   bundle the medium carries (a site that never logged in learns the server
   and the user from it, and needs a login with a token only to sync);
2. the lock: with the server reachable, the medium's epoch is handed to this
   site (compare-and-set: of two copies of one key, one wins, and the other is
   told so in one line); with no network, the medium's epoch is used as is,
   and the first commit wins later (DESIGN.md, "Lock record");
3. the local state becomes HELD at the medium's version and epoch, with its
   manifests; the resume then runs it like any local state, the medium first
   among its sources. Offline, every chunk the version needs must be on the
   medium or in this site's cache, or the resume is refused before anything runs.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import AuthError, ChunkUnavailable, Conflict, StateError, Unreachable, UsageError
from ..keys import KeyBundle
from ..locktoken import CarriedKeys, LockToken
from . import account, media
from .media import MediumReader
from .cache import SiteCache
from ..keyring import LazyKeyring
from .parcel import Site, boot_tags, load_version, open_site
from .segments import whole
from .registry import SourceRegistry
from .state import LocalStatus


@dataclass
class Carried:
    site: Site
    parcel: uuid.UUID
    source: MediumReader
    token: LockToken
    online: bool


def _keys(root: Path, passphrase: Callable[[], str]) -> account.Account:
    """This site's account with unlocked keys: as it is, or opened with the medium's bundle."""
    plug = media.plugin()
    raw = plug.read_keybundle(root)
    carried = CarriedKeys.decode(raw) if raw is not None else None
    try:
        acct = account.load_account()
    except AuthError:
        if carried is None:
            raise AuthError("this site has no login and the medium carries no key bundle",
                            hint="log in here once with `isrsync login`") from None
        acct = account.Account(carried.server, carried.user)
        account.save_account(acct)
    try:
        account.session_keys(acct)
        return acct
    except AuthError:
        if carried is None or (carried.server, carried.user) != (acct.server, acct.user):
            raise
    bundle, sk = KeyBundle.unseal_keyed(carried.sealed_bundle, passphrase())
    account.remember(acct, bundle, sk)
    return acct


def _pick_parcel(root: Path, bundle_parcels: set[str], ref: str | None) -> tuple[uuid.UUID, bytes]:
    plug = media.plugin()
    tokens: dict[uuid.UUID, bytes] = {}
    for pid in (uuid.UUID(p) for p in bundle_parcels):
        raw = plug.read_lock_token(root, pid)
        if raw is not None:
            tokens[pid] = raw
    if ref is not None:
        try:
            want = uuid.UUID(ref)
        except ValueError:
            want = None
        tokens = {p: t for p, t in tokens.items() if p == want} if want is not None else tokens
    if not tokens:
        raise UsageError(f"the medium at {root} carries no lock of your parcels",
                         hint="carry one with `isrsync suspend --to-usb PATH --carry-lock`")
    if len(tokens) > 1:
        raise UsageError("the medium carries the locks of several parcels: " + ", ".join(map(str, tokens)),
                         hint="name one by its id")
    ((pid, raw),) = tokens.items()
    return pid, raw


async def take(path: str, ref: str | None, cache: SiteCache, passphrase: Callable[[], str]) -> Carried:
    """Open the medium at ``path`` (or ``auto``), take its lock, and ready the local state."""
    root = media.pick_medium(path)
    acct = await asyncio.to_thread(_keys, root, passphrase)
    site = await open_site(cache, acct)
    try:
        return await _take(site, root, ref)
    except BaseException:
        await site.close()
        raise


async def _take(site: Site, root: Path, ref: str | None) -> Carried:
    plug = media.plugin()
    pid, raw = await asyncio.to_thread(_pick_parcel, root, set(site.bundle.parcels), ref)
    token = LockToken.unseal(raw, site.master_key(pid), pid)
    state = site.state(pid)
    try:
        here = state.info()
        again = here.status.has_lock and here.base is not None and here.base >= token.version
        if not again and here.status is not LocalStatus.IDLE:
            raise StateError(f"this site has {here.status.value} state of parcel {pid} already",
                             hint="`isrsync sync` or `isrsync discard` it first")
        # Again: this site took the medium's lock before (offline) and suspended here since.
        epoch, online = (here.epoch if again and here.epoch else token.epoch), True
        if epoch == token.epoch:  # the medium still holds it on the server: hand it here
            try:
                lock = await site.store.hand_over(pid, token.epoch, site.holder())
                if lock.version != token.version:
                    raise Conflict(f"parcel {pid} moved on to version {lock.version} since the medium was written "
                                   f"(version {token.version}): another copy of the medium was used first",
                                   hint="resume the parcel from the server instead; the medium is out of date")
                epoch = lock.epoch
                if again:
                    await asyncio.to_thread(state.took_lock, epoch)
            except Unreachable:
                online = False
        source = await asyncio.to_thread(plug.open_source, root, site.cache.path)
        try:
            if not again:
                manifests = await asyncio.to_thread(plug.read_manifests, root, pid)
                if token.version not in manifests:
                    raise UsageError(f"the medium lacks the manifest of version {token.version}")
                # Manifests only (no status yet): a refused resume leaves this site as it was.
                await asyncio.to_thread(state.put_manifests, manifests)
            if not online:
                await _check_complete(site, pid, token.version, source)
            if not again:
                await asyncio.to_thread(state.carried_in, token.version, epoch, site.host, {})
        except BaseException:
            await source.close()
            raise
        return Carried(site, pid, source, token, online)
    finally:
        state.close()


async def _check_complete(site: Site, pid: uuid.UUID, version: int, source: MediumReader) -> None:
    """Offline: every chunk of ``version`` must be here or on the medium, or nothing runs."""
    state = site.state(pid)
    try:
        m = await load_version(site, pid, version, state, lazy=True)
    finally:
        state.close()
    assert m.keyring is not None
    segs = {r.tag for r in m.segments or () if not r.is_zero}
    if isinstance(m.keyring, LazyKeyring):
        # Its segments from the cache or the medium (never closed here: the resume reads it next).
        reg = SourceRegistry(site.cache)
        reg.add(source)
        try:
            await whole(m.keyring, reg)
        except ChunkUnavailable:
            pass  # counted below, among what is missing
    have_ring = not isinstance(m.keyring, LazyKeyring) or m.keyring.complete
    tags = (set(m.keyring.tags()) if have_ring else set()) | segs | boot_tags(m.vm) | (
        m.memory.tags() if m.memory is not None else set())
    missing = await asyncio.to_thread(site.cache.missing, tags)
    if missing:
        have = await source.holds(missing)
        missing = [t for t in missing if t not in have]
    if missing:
        raise ChunkUnavailable(
            f"{len(missing)} chunks of version {version} are neither on the medium nor in this site's cache, "
            "and the server cannot be reached",
            hint="connect to the server, or carry the parcel with `isrsync suspend --to-usb --full --carry-lock`")

