"""The Store conformance suite (restic's backend tests, for isrsync homes).

Written only against the :class:`~isrsync.store.base.Store` protocol and the
contract in its docstrings; tests/store/conftest.py runs every test here once
per backend (``store``, ``other_user_store``, ``second_site_store``).
Everything uploaded is real: packs come from :func:`pack_stream`, manifests
from :func:`manifest.encode`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from isrsync import manifest
from isrsync.chunk import tag_of
from isrsync.errors import (
    Conflict,
    FormatError,
    IntegrityError,
    LockHeld,
    NotFound,
    UsageError,
)
from isrsync.manifest import Keyring, manifest_hash, parse_header
from isrsync.site.packer import PackedImage, pack_stream
from isrsync.store.base import (
    CommitRequest,
    Holder,
    LockState,
    ParcelInfo,
    Store,
    VersionInfo,
)
from isrsync.store.wire import MAX_TORRENT
from isrsync.swarm.torrent import load_torrent, make_torrent
from isrsync.vmspec import VmSpec

MiB = 1 << 20
SITE_A = Holder("site-a", "host-a.example")
SITE_B = Holder("site-b", "host-b.example")
MEDIUM = Holder.for_medium("3f0c9a7e", "KINGSTON-16G")
INVALID_NAMES = ["../x", "", "a/b", "x" * 200, ".hidden", "-opt", "a b", "é", "..", "."]
VM = VmSpec(machine="q35", memory_mib=512, cpus=1)


def h32(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=32).digest()


# -- helpers: real packs and manifests ---------------------------------------------------


@dataclass
class Image:
    """A packed plaintext image: its keyring and the pack files it produced."""

    packed: PackedImage
    plain: bytes

    @property
    def keyring(self) -> Keyring:
        return self.packed.keyring

    @property
    def pack_ids(self) -> list[bytes]:
        return [info.pack_id for info, _ in self.packed.packs]

    @property
    def paths(self) -> list[Path]:
        return [p for _, p in self.packed.packs]

    @property
    def tags(self) -> list[bytes]:
        return [e.tag for info, _ in self.packed.packs for e in info.entries]

    @property
    def size(self) -> int:
        return sum(info.size for info, _ in self.packed.packs)


@dataclass
class Scenario:
    """One parcel of a store, with its master key and convergence secret."""

    store: Store
    parcel: uuid.UUID
    name: str
    work: Path
    key: bytes = field(default_factory=lambda: os.urandom(32))
    secret: bytes = field(default_factory=lambda: os.urandom(32))
    _n: int = 0

    @classmethod
    async def create(cls, store: Store, tmp: Path, name: str = "vm1") -> Scenario:
        pid = uuid.uuid4()
        await store.create_parcel(pid, name)
        work = tmp / f"work-{name}-{pid.hex[:8]}"
        work.mkdir(parents=True)
        return cls(store, pid, name, work)

    def image(self, size: int = 2 * MiB, limit: int = MiB) -> Image:
        """Random (incompressible) plaintext packed into real packs of ~limit bytes."""
        self._n += 1
        out = self.work / f"packs-{self._n}"
        out.mkdir()
        plain = os.urandom(size)
        return Image(pack_stream(io.BytesIO(plain), size, self.secret, out, limit=limit), plain)

    async def upload(self, img: Image) -> None:
        for pid, path in zip(img.pack_ids, img.paths):
            await self.store.put_pack(self.parcel, pid, path)

    def v1(self, img: Image, parcel: uuid.UUID | None = None) -> bytes:
        return manifest.encode(
            parcel=parcel or self.parcel, version=1, master_key=self.key, vm=VM, keyring=img.keyring,
            site="site-a", time=time.time(),
        )

    def req(self, m: bytes, epoch: int, img: Image | None = None, *, parent: int = 0,
            release: bool = True, site: str = "site-a", **kw: Any) -> CommitRequest:
        return CommitRequest(
            epoch=epoch, parent=parent, manifest=m,
            packs=kw.pop("packs", img.pack_ids if img else []),
            added=kw.pop("added", sorted(img.keyring.tags()) if img else []),
            release=release, site=site, **kw,
        )

    async def commit_v1(self, *, release: bool = True, size: int = 2 * MiB) -> tuple[Image, bytes, VersionInfo, LockState]:
        """Upload an image, take the lock as SITE_A and commit version 1."""
        img = self.image(size)
        await self.upload(img)
        lock = await self.store.acquire(self.parcel, SITE_A)
        m = self.v1(img)
        vi = await self.store.commit(self.parcel, self.req(m, lock.epoch, img, release=release))
        return img, m, vi, lock


async def state(store: Store, parcel: uuid.UUID) -> tuple:
    """Everything a failed call must leave unchanged."""
    info = await store.parcel(parcel)
    versions = await store.list_versions(parcel)
    mans = await store.get_manifests(parcel, 1, info.version) if info.version else []
    return info, versions, mans


async def raises(cls: type[BaseException], call: Callable[[], Awaitable[Any]], what: str) -> BaseException:
    """Await ``call()`` and return the ``cls`` it raised; fail naming ``what`` otherwise."""
    try:
        got = await call()
    except cls as e:
        return e
    except Exception as e:  # noqa: BLE001 - reported with the operation's name
        pytest.fail(f"{what}: expected {cls.__name__}, got {type(e).__name__}: {e}")
    pytest.fail(f"{what}: expected {cls.__name__}, it returned {got!r}")


def norm(err: BaseException, *refs: object) -> tuple[type, str, str]:
    """An error with the identifiers the caller itself passed blanked out."""
    msg, hint = getattr(err, "message", str(err)), getattr(err, "hint", "")
    for i, r in enumerate(refs):
        msg = msg.replace(str(r), f"<{i}>")
        if isinstance(r, bytes):
            msg = msg.replace(r.hex()[:16], f"<{i}>")
    return type(err), msg, hint


# -- the suite -------------------------------------------------------------------------------


class TestProtocol:
    async def test_backend_is_a_store(self, store: Store) -> None:
        assert isinstance(store, Store)
        assert await store.list_parcels() == []


class TestKeyBundle:
    async def test_none_before_first_put(self, store: Store) -> None:
        assert await store.get_key_bundle() is None

    async def test_put_then_get(self, store: Store) -> None:
        blob = os.urandom(700)
        await store.put_key_bundle(blob, None)
        assert await store.get_key_bundle() == blob

    async def test_stale_expect_conflicts_and_changes_nothing(self, store: Store) -> None:
        a, b, c = os.urandom(100), os.urandom(100), os.urandom(100)
        await store.put_key_bundle(a, None)
        with pytest.raises(Conflict):
            await store.put_key_bundle(b, None)  # expects "no bundle", there is one
        with pytest.raises(Conflict):
            await store.put_key_bundle(b, h32(c))  # expects a bundle that never was
        assert await store.get_key_bundle() == a
        await store.put_key_bundle(b, h32(a))
        assert await store.get_key_bundle() == b
        with pytest.raises(Conflict):
            await store.put_key_bundle(c, h32(a))  # a lost update: a is gone
        assert await store.get_key_bundle() == b

    async def test_replayed_put_is_idempotent(self, store: Store) -> None:
        a, b = os.urandom(100), os.urandom(100)
        await store.put_key_bundle(a, None)
        await store.put_key_bundle(a, None)  # the retry of a put that landed
        await store.put_key_bundle(b, h32(a))
        await store.put_key_bundle(b, h32(a))
        assert await store.get_key_bundle() == b

    async def test_bundle_is_per_user(self, store: Store, other_user_store: Store) -> None:
        a, x = os.urandom(64), os.urandom(64)
        await store.put_key_bundle(a, None)
        assert await other_user_store.get_key_bundle() is None
        await other_user_store.put_key_bundle(x, None)
        assert await store.get_key_bundle() == a
        assert await other_user_store.get_key_bundle() == x


class TestParcels:
    async def test_create_gives_an_empty_free_parcel(self, store: Store) -> None:
        pid = uuid.uuid4()
        before = time.time()
        info = await store.create_parcel(pid, "work-vm", hardware="x86_64/kvm")
        assert isinstance(info, ParcelInfo)
        assert (info.parcel, info.name, info.version) == (pid, "work-vm", 0)
        assert info.lock == LockState(pid, 0, 0, None, "x86_64/kvm")
        assert before - 5 <= info.created <= time.time() + 5

    async def test_get_by_uuid_and_by_name(self, store: Store) -> None:
        pid = uuid.uuid4()
        info = await store.create_parcel(pid, "vm.by-name_1")
        assert await store.parcel(pid) == info
        assert await store.parcel(str(pid)) == info
        assert await store.parcel("vm.by-name_1") == info

    async def test_list_with_lock_state_and_version(self, store: Store) -> None:
        p1, p2 = uuid.uuid4(), uuid.uuid4()
        i1 = await store.create_parcel(p1, "alpha")
        i2 = await store.create_parcel(p2, "beta")
        listed = {p.parcel: p for p in await store.list_parcels()}
        assert listed == {p1: i1, p2: i2}
        assert all(p.version == 0 and p.lock.epoch == 0 and p.lock.holder is None for p in listed.values())
        await store.acquire(p2, SITE_A)
        listed = {p.parcel: p for p in await store.list_parcels()}
        assert listed[p1].lock.holder is None
        assert listed[p2].lock.epoch == 1
        assert listed[p2].lock.holder is not None and listed[p2].lock.holder.site == "site-a"

    async def test_duplicate_name_conflicts(self, store: Store) -> None:
        await store.create_parcel(uuid.uuid4(), "dup")
        with pytest.raises(Conflict):
            await store.create_parcel(uuid.uuid4(), "dup")
        assert [p.name for p in await store.list_parcels()] == ["dup"]

    async def test_duplicate_id_conflicts(self, store: Store) -> None:
        pid = uuid.uuid4()
        await store.create_parcel(pid, "first")
        with pytest.raises(Conflict):
            await store.create_parcel(pid, "second")
        assert [p.name for p in await store.list_parcels()] == ["first"]

    async def test_retried_create_returns_the_same_parcel(self, store: Store) -> None:
        pid = uuid.uuid4()
        a = await store.create_parcel(pid, "retry")
        b = await store.create_parcel(pid, "retry")
        assert a == b
        assert len(await store.list_parcels()) == 1

    async def test_same_name_for_different_users(self, store: Store, other_user_store: Store) -> None:
        pa, pb = uuid.uuid4(), uuid.uuid4()
        await store.create_parcel(pa, "desktop")
        await other_user_store.create_parcel(pb, "desktop")
        assert (await store.parcel("desktop")).parcel == pa
        assert (await other_user_store.parcel("desktop")).parcel == pb

    async def test_invalid_names_are_refused_on_create(self, store: Store) -> None:
        problems = []
        for name in INVALID_NAMES:
            try:
                await raises(UsageError, lambda name=name: store.create_parcel(uuid.uuid4(), name), f"create {name[:20]!r}")
            except pytest.fail.Exception as e:
                problems.append(str(e))
        assert not problems, "\n".join(problems)
        assert await store.list_parcels() == []

    async def test_invalid_names_are_refused_on_lookup(self, store: Store) -> None:
        # A name that create refuses can name no parcel; both backends must
        # answer alike, as create does (UsageError: "not a valid parcel name").
        await store.create_parcel(uuid.uuid4(), "x" * 128)
        problems = []
        for name in INVALID_NAMES:
            try:
                await raises(UsageError, lambda name=name: store.parcel(name), f"lookup {name[:20]!r}")
            except pytest.fail.Exception as e:
                problems.append(str(e))
        assert not problems, "\n".join(problems)

    async def test_unknown_parcel_is_not_found(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(256 * 1024)
        ghost = uuid.uuid4()
        with pytest.raises(NotFound):
            await store.parcel(ghost)
        with pytest.raises(NotFound):
            await store.parcel("no-such-parcel")
        problems = []
        for label, call in parcel_ops(store, ghost, img, scn.v1(img, ghost)).items():
            try:
                await raises(NotFound, call, f"{label} on an unknown parcel")
            except pytest.fail.Exception as e:
                problems.append(str(e))
        assert not problems, "\n".join(problems)


def parcel_ops(s: Store, pid: uuid.UUID, img: Image, m: bytes) -> dict[str, Callable[[], Awaitable[Any]]]:
    """Every per-parcel operation of the protocol, aimed at ``pid``."""
    pack, path, tag = img.pack_ids[0], img.paths[0], img.tags[0]
    return {
        "lock_status": lambda: s.lock_status(pid),
        "list_versions": lambda: s.list_versions(pid),
        "get_manifests": lambda: s.get_manifests(pid, 1, 1),
        "put_pack": lambda: s.put_pack(pid, pack, path),
        "get_pack": lambda: s.get_pack(pid, pack),
        "get_pack_range": lambda: s.get_pack(pid, pack, 16, 100),
        "pack_size": lambda: s.pack_size(pid, pack),
        "have_packs": lambda: s.have_packs(pid, [pack]),
        "locate": lambda: s.locate(pid, [tag]),
        "acquire": lambda: s.acquire(pid, SITE_B),
        "release": lambda: s.release(pid, 1),
        "break_lock": lambda: s.break_lock(pid, "stolen laptop"),
        "hand_over": lambda: s.hand_over(pid, 1, MEDIUM),
        "commit": lambda: s.commit(pid, CommitRequest(epoch=1, parent=1, manifest=m, packs=[pack])),
    }


class TestIsolation:
    async def test_other_users_parcel_is_indistinguishable_from_none(
        self, store: Store, other_user_store: Store, tmp_path: Path
    ) -> None:
        bob = other_user_store
        scn = await Scenario.create(store, tmp_path, "alices-secret-vm")
        img, m1, _, lock = await scn.commit_v1(release=False)
        before = await state(store, scn.parcel)
        pid, ghost = scn.parcel, uuid.uuid4()

        assert await bob.list_parcels() == []
        for ref, ghost_ref in ((pid, ghost), (str(pid), str(ghost)), (scn.name, "nobodys-vm")):
            with pytest.raises(NotFound) as real:
                await bob.parcel(ref)
            with pytest.raises(NotFound) as none:
                await bob.parcel(ghost_ref)
            assert norm(real.value, ref) == norm(none.value, ghost_ref)

        m2 = scn.v1(img)  # a different version 1 bob might try to commit
        real_ops, ghost_ops = parcel_ops(bob, pid, img, m2), parcel_ops(bob, ghost, img, m2)
        problems: list[str] = []  # every operation is tried; all failures are reported
        for label in real_ops:
            try:
                real = await raises(NotFound, real_ops[label], f"{label} on another user's parcel")
                none = await raises(NotFound, ghost_ops[label], f"{label} on an unknown parcel")
            except pytest.fail.Exception as e:
                problems.append(str(e))
                continue
            if norm(real, pid, ghost) != norm(none, ghost, pid):
                problems.append(f"{label}: {norm(real, pid, ghost)} != {norm(none, ghost, pid)}")
            problems += [f"{label} leaks {x!r}: {real}" for x in ("alice", scn.name, "site-a", "host-a")
                         if x in str(real)]
        assert not problems, "\n".join(problems)

        # Nothing bob tried changed alice's parcel.
        assert await state(store, pid) == before
        assert (await store.lock_status(pid)) == before[0].lock
        assert before[0].lock.epoch == lock.epoch and before[0].lock.holder == lock.holder
        assert await store.have_packs(pid, img.pack_ids) == set(img.pack_ids)
        assert await store.get_manifests(pid, 1, 1) == [m1]

    async def test_creating_another_users_parcel_id_is_like_a_fresh_id(
        self, store: Store, other_user_store: Store, tmp_path: Path
    ) -> None:
        # Issue 14: bob creating a parcel with alice's id got "409 parcel id … is
        # taken" (with the hint "your local changes are kept"): an oracle for
        # alice's ids. Ids are per user: bob gets a parcel of his own, exactly as
        # for an id nobody has, and neither parcel sees the other.
        bob = other_user_store
        scn = await Scenario.create(store, tmp_path, "alices-secret-vm")
        img, m1, _, _ = await scn.commit_v1(release=False)
        before = await state(store, scn.parcel)
        ghost = uuid.uuid4()

        def shape(p: ParcelInfo) -> tuple:
            return (p.version, p.lock.epoch, p.lock.version, p.lock.holder, p.lock.hardware)

        fresh = await bob.create_parcel(ghost, "bobs-fresh")
        taken = await bob.create_parcel(scn.parcel, "bobs-vm")
        assert taken.parcel == scn.parcel and taken.name == "bobs-vm"
        assert shape(taken) == shape(fresh) == (0, 0, 0, None, "")
        assert await bob.create_parcel(scn.parcel, "bobs-vm") == taken  # a retry, as for any id
        assert sorted(p.name for p in await bob.list_parcels()) == ["bobs-fresh", "bobs-vm"]
        assert (await bob.parcel(scn.parcel)).name == "bobs-vm"
        # bob's parcel is empty and his: nothing of alice's shows through it.
        assert await bob.list_versions(scn.parcel) == []
        with pytest.raises(NotFound):
            await bob.get_manifests(scn.parcel, 1, 1)
        assert await bob.have_packs(scn.parcel, img.pack_ids) == set()
        assert await bob.pack_size(scn.parcel, img.pack_ids[0]) is None
        assert await bob.locate(scn.parcel, img.tags[:4]) == {}
        lock = await bob.acquire(scn.parcel, SITE_B)
        assert lock.epoch == 1 and lock.holder is not None and lock.holder.site == SITE_B.site
        await bob.break_lock(scn.parcel, "test")
        # alice's parcel did not move, and she still sees only hers.
        assert await state(store, scn.parcel) == before
        assert [p.name for p in await store.list_parcels()] == ["alices-secret-vm"]
        assert await store.get_manifests(scn.parcel, 1, 1) == [m1]
        assert (await store.lock_status(scn.parcel)).holder == before[0].lock.holder

    async def test_other_user_cannot_claim_a_pack_by_its_id(
        self, store: Store, other_user_store: Store, tmp_path: Path
    ) -> None:
        # Knowing a pack id must not be enough to stage (and then download)
        # another user's pack: the bytes are verified against the id even when
        # the server already holds a pack of that id.
        alice = await Scenario.create(store, tmp_path, "a-vm")
        img, *_ = await alice.commit_v1()
        bob = await Scenario.create(other_user_store, tmp_path, "b-vm")
        fake = tmp_path / "not-the-pack"
        fake.write_bytes(os.urandom(img.paths[0].stat().st_size))
        try:
            await other_user_store.put_pack(bob.parcel, img.pack_ids[0], fake)
        except IntegrityError:
            pass
        else:
            leaked = await other_user_store.get_pack(bob.parcel, img.pack_ids[0])
            pytest.fail(
                "put_pack accepted random bytes under the id of another user's pack; "
                f"get_pack then returned {'that pack' if leaked == img.paths[0].read_bytes() else 'bytes'}"
            )
        assert await other_user_store.have_packs(bob.parcel, img.pack_ids) == set()
        assert await other_user_store.pack_size(bob.parcel, img.pack_ids[0]) is None
        with pytest.raises(NotFound):
            await other_user_store.get_pack(bob.parcel, img.pack_ids[0])
        assert await other_user_store.locate(bob.parcel, img.tags[:4]) == {}


class TestPacks:
    async def test_put_stages_and_have_reports(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(3 * MiB)
        assert len(img.pack_ids) >= 3
        await scn.upload(img)
        stranger = os.urandom(32)
        assert await store.have_packs(scn.parcel, [*img.pack_ids, stranger]) == set(img.pack_ids)
        for pid, path in zip(img.pack_ids, img.paths):
            assert await store.pack_size(scn.parcel, pid) == path.stat().st_size
        assert await store.pack_size(scn.parcel, stranger) is None
        # Staged is not committed: locate knows committed packs only.
        assert await store.locate(scn.parcel, img.tags) == {}
        assert (await store.parcel(scn.parcel)).version == 0

    async def test_reupload_is_a_noop(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(2 * MiB)
        await scn.upload(img)
        await scn.upload(img)
        assert await store.have_packs(scn.parcel, img.pack_ids) == set(img.pack_ids)
        for pid, path in zip(img.pack_ids, img.paths):
            assert await store.pack_size(scn.parcel, pid) == path.stat().st_size
            assert await store.get_pack(scn.parcel, pid) == path.read_bytes()

    async def test_same_pack_in_two_parcels(self, store: Store, tmp_path: Path) -> None:
        a = await Scenario.create(store, tmp_path, "one")
        b = await Scenario.create(store, tmp_path, "two")
        img = a.image(MiB)
        await a.upload(img)
        assert await store.have_packs(b.parcel, img.pack_ids) == set()
        await store.put_pack(b.parcel, img.pack_ids[0], img.paths[0])
        assert await store.have_packs(b.parcel, img.pack_ids) == {img.pack_ids[0]}
        assert await store.get_pack(b.parcel, img.pack_ids[0]) == img.paths[0].read_bytes()

    async def test_concurrent_uploads_of_one_pack(self, store: Store, second_site_store: Store, tmp_path: Path) -> None:
        # Two sites of one user (or one site, for two parcels) may push the same
        # pack at once: put_pack is idempotent, so all of them must succeed.
        a = await Scenario.create(store, tmp_path, "one")
        b = await Scenario.create(store, tmp_path, "two")
        img = a.image(40 * MiB, limit=64 * MiB)
        assert len(img.pack_ids) == 1
        pid, path = img.pack_ids[0], img.paths[0]
        got = await asyncio.gather(
            store.put_pack(a.parcel, pid, path), second_site_store.put_pack(a.parcel, pid, path),
            store.put_pack(b.parcel, pid, path), second_site_store.put_pack(b.parcel, pid, path),
            return_exceptions=True,
        )
        assert [g for g in got if isinstance(g, BaseException)] == []
        for p in (a.parcel, b.parcel):
            assert await store.have_packs(p, [pid]) == {pid}
            assert await store.get_pack(p, pid) == path.read_bytes()

    @pytest.mark.parametrize("damage", ["flip", "truncate", "other-pack", "append"])
    async def test_bytes_not_matching_the_id_are_refused(
        self, store: Store, tmp_path: Path, damage: str
    ) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(2 * MiB)
        pid, good = img.pack_ids[0], img.paths[0].read_bytes()
        bad = tmp_path / "bad-pack"
        if damage == "flip":
            raw = bytearray(good)
            raw[len(raw) // 2] ^= 0x40
            bad.write_bytes(bytes(raw))
        elif damage == "truncate":
            bad.write_bytes(good[: len(good) - 1000])
        elif damage == "append":
            bad.write_bytes(good + b"\0" * 10)
        else:
            bad.write_bytes(img.paths[1].read_bytes())
        with pytest.raises(IntegrityError):
            await store.put_pack(scn.parcel, pid, bad)
        assert await store.have_packs(scn.parcel, img.pack_ids) == set()
        assert await store.pack_size(scn.parcel, pid) is None
        with pytest.raises(NotFound):
            await store.get_pack(scn.parcel, pid)
        # Nothing half-accepted is in the way of the right bytes.
        await store.put_pack(scn.parcel, pid, img.paths[0])
        assert await store.get_pack(scn.parcel, pid) == good

    async def test_known_id_with_wrong_bytes_is_refused(self, store: Store, tmp_path: Path) -> None:
        # The same user, another parcel: the id is known to the home, the bytes
        # offered are not that pack. "verified against pack_id" has no exception.
        a = await Scenario.create(store, tmp_path, "one")
        b = await Scenario.create(store, tmp_path, "two")
        img = a.image(MiB)
        await a.upload(img)
        fake = tmp_path / "fake"
        fake.write_bytes(b"\0" * img.paths[0].stat().st_size)
        with pytest.raises(IntegrityError):
            await store.put_pack(b.parcel, img.pack_ids[0], fake)
        assert await store.have_packs(b.parcel, img.pack_ids) == set()

    async def test_get_pack_full_and_ranges(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB + 5000)
        await scn.upload(img)
        pid, raw = img.pack_ids[0], img.paths[0].read_bytes()
        n = len(raw)
        assert await store.get_pack(scn.parcel, pid) == raw
        for off, length in [(0, 16), (0, n), (17, 1000), (n - 56, 56), (n - 1, 1), (5, 0), (123_457, 65_536)]:
            got = await store.get_pack(scn.parcel, pid, off, length)
            assert got == raw[off : off + length], (off, length)
        assert await store.get_pack(scn.parcel, pid, 100) == raw[100:]
        assert await store.get_pack(scn.parcel, pid, offset=n - 3) == raw[-3:]

    @pytest.mark.parametrize("where", ["past-end", "overlapping-end"])
    async def test_get_pack_range_outside_is_a_usage_error(
        self, store: Store, tmp_path: Path, where: str
    ) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        n = img.paths[0].stat().st_size
        off, length = (n + 10, 5) if where == "past-end" else (n - 10, 100)
        with pytest.raises(UsageError):
            await store.get_pack(scn.parcel, img.pack_ids[0], off, length)

    async def test_get_unknown_pack_is_not_found(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        with pytest.raises(NotFound):
            await store.get_pack(scn.parcel, os.urandom(32))
        with pytest.raises(NotFound):
            await store.get_pack(scn.parcel, os.urandom(32), 0, 10)

    async def test_locate_finds_committed_chunks_only(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img, *_ = await scn.commit_v1(size=3 * MiB)
        extra = scn.image(MiB)
        await scn.upload(extra)  # staged, never committed
        stranger = os.urandom(32)
        found = await store.locate(scn.parcel, [*img.tags, stranger, *extra.tags])
        assert set(found) == set(img.tags)
        for tag, entry in found.items():
            assert entry.tag == tag and entry.pack_id in img.pack_ids
            data = await store.get_pack(scn.parcel, entry.pack_id, entry.offset, entry.length)
            assert tag_of(data) == tag
        # Staged packs are readable all the same (a commit may be under way).
        assert await store.get_pack(scn.parcel, extra.pack_ids[0]) == extra.paths[0].read_bytes()


class TestTorrents:
    """A pack's torrent is kept beside it, per user; a pack without one is no error."""

    async def test_put_then_get_round_trip(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        pid, path = img.pack_ids[0], img.paths[0]
        t = await make_torrent(path, pid)
        assert await store.get_torrent(scn.parcel, pid) is None, "an uploaded pack has no torrent yet"
        await store.put_torrent(scn.parcel, pid, t.data)
        await store.put_torrent(scn.parcel, pid, t.data)  # a retry
        got = await store.get_torrent(scn.parcel, pid)
        assert got == t.data
        assert load_torrent(pid, got, size=path.stat().st_size).info_hash == t.info_hash
        # Committing does not lose it, and the pack bytes are unchanged.
        lock = await store.acquire(scn.parcel, SITE_A)
        await store.commit(scn.parcel, scn.req(scn.v1(img), lock.epoch, img))
        assert await store.get_torrent(scn.parcel, pid) == t.data
        assert await store.get_pack(scn.parcel, pid) == path.read_bytes()

    async def test_put_replaces(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        pid = img.pack_ids[0]
        await store.put_torrent(scn.parcel, pid, b"d1:xi1ee")
        await store.put_torrent(scn.parcel, pid, b"d1:xi2ee")
        assert await store.get_torrent(scn.parcel, pid) == b"d1:xi2ee"

    async def test_pack_the_parcel_lacks_is_not_found(self, store: Store, tmp_path: Path) -> None:
        a = await Scenario.create(store, tmp_path, "one")
        b = await Scenario.create(store, tmp_path, "two")
        img = a.image(MiB)
        await a.upload(img)
        pid = img.pack_ids[0]
        for parcel, pack in ((b.parcel, pid), (a.parcel, os.urandom(32)), (uuid.uuid4(), pid)):
            await raises(NotFound, lambda: store.put_torrent(parcel, pack, b"d1:xi1ee"), "put_torrent")
            await raises(NotFound, lambda: store.get_torrent(parcel, pack), "get_torrent")

    async def test_malformed_torrent_is_refused(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        pid = img.pack_ids[0]
        for bad in (b"", b"not bencode", b"li1ee", b"d" + bytes(MAX_TORRENT) + b"e"):
            await raises(FormatError, lambda: store.put_torrent(scn.parcel, pid, bad), f"put_torrent {bad[:8]!r}")
        assert await store.get_torrent(scn.parcel, pid) is None

    async def test_torrents_are_per_user(self, store: Store, other_user_store: Store, tmp_path: Path) -> None:
        mine = await Scenario.create(store, tmp_path, "mine")
        theirs = await Scenario.create(other_user_store, tmp_path, "theirs")
        img = mine.image(MiB)
        await mine.upload(img)
        await theirs.upload(img)  # the same pack, shared by id on the server
        pid = img.pack_ids[0]
        await store.put_torrent(mine.parcel, pid, b"d1:xi1ee")
        assert await other_user_store.get_torrent(theirs.parcel, pid) is None
        await raises(NotFound, lambda: other_user_store.get_torrent(mine.parcel, pid), "another user's parcel")

    async def test_torrent_of_a_parcel_whose_id_another_user_has(
        self, store: Store, other_user_store: Store, tmp_path: Path
    ) -> None:
        # Parcel ids are per user: bob's parcel with alice's id has a row key
        # of its own, and his torrents go with that row, not with the id.
        alice = await Scenario.create(store, tmp_path, "alices")
        img = alice.image()
        assert len(img.pack_ids) >= 2
        await other_user_store.create_parcel(alice.parcel, "bobs")
        mine, theirs = img.pack_ids[0], img.pack_ids[1]
        await store.put_pack(alice.parcel, theirs, img.paths[1])
        await other_user_store.put_pack(alice.parcel, mine, img.paths[0])
        await other_user_store.put_torrent(alice.parcel, mine, b"d3:bobi1ee")
        assert await other_user_store.get_torrent(alice.parcel, mine) == b"d3:bobi1ee"
        # alice's pack is not in bob's parcel, whatever its id.
        await raises(NotFound, lambda: other_user_store.put_torrent(alice.parcel, theirs, b"d1:xi1ee"),
                     "a torrent of a pack only alice's parcel of that id has")


class TestLock:
    async def test_acquire_free_lock(self, store: Store, home, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        before = time.time()
        s = await store.acquire(scn.parcel, SITE_A)
        assert (s.parcel, s.epoch, s.version) == (scn.parcel, 1, 0)
        assert s.holder is not None
        assert (s.holder.site, s.holder.host, s.holder.user) == ("site-a", "host-a.example", home.name_of("alice"))
        assert before - 5 <= s.holder.since <= time.time() + 5
        assert await store.lock_status(scn.parcel) == s
        assert (await store.parcel(scn.parcel)).lock == s

    async def test_acquire_by_the_holder_again_is_idempotent(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        a = await store.acquire(scn.parcel, SITE_A)
        b = await store.acquire(scn.parcel, SITE_A)
        assert a == b and b.epoch == 1

    async def test_acquire_by_another_site_names_the_holder(
        self, store: Store, second_site_store: Store, tmp_path: Path
    ) -> None:
        scn = await Scenario.create(store, tmp_path)
        held = await store.acquire(scn.parcel, SITE_A)
        with pytest.raises(LockHeld) as e:
            await second_site_store.acquire(scn.parcel, SITE_B)
        assert "host-a.example" in str(e.value) and "site-a" in str(e.value)
        assert e.value.details.get("site") == "site-a"
        assert e.value.details.get("host") == "host-a.example"
        assert await store.lock_status(scn.parcel) == held

    async def test_release_frees(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        a = await store.acquire(scn.parcel, SITE_A)
        r = await store.release(scn.parcel, a.epoch)
        assert r.holder is None and r.epoch == a.epoch
        assert await store.lock_status(scn.parcel) == r
        # A replayed release (its answer was lost) answers alike.
        assert await store.release(scn.parcel, a.epoch) == r
        b = await store.acquire(scn.parcel, SITE_B)
        assert b.epoch == a.epoch + 1 and b.holder is not None and b.holder.site == "site-b"

    async def test_release_with_stale_epoch_conflicts(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        old = await store.acquire(scn.parcel, SITE_A)
        await store.break_lock(scn.parcel)
        new = await store.acquire(scn.parcel, SITE_B)
        for stale in (old.epoch, new.epoch + 1, 0):
            with pytest.raises(Conflict):
                await store.release(scn.parcel, stale)
        assert await store.lock_status(scn.parcel) == new

    async def test_release_of_a_free_lock_with_a_stale_epoch_conflicts(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        a = await store.acquire(scn.parcel, SITE_A)
        broken = await store.break_lock(scn.parcel)
        with pytest.raises(Conflict):
            await store.release(scn.parcel, a.epoch)
        assert await store.lock_status(scn.parcel) == broken

    async def test_break_bumps_epoch_and_frees(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        a = await store.acquire(scn.parcel, SITE_A)
        b = await store.break_lock(scn.parcel, "lost laptop")
        assert b.holder is None and b.epoch == a.epoch + 1
        assert await store.lock_status(scn.parcel) == b
        c = await store.break_lock(scn.parcel)  # breaking a free lock still fences
        assert c.holder is None and c.epoch == b.epoch + 1

    async def test_every_acquire_from_free_increments_the_epoch(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        epochs = []
        for i in range(3):
            s = await store.acquire(scn.parcel, SITE_A if i % 2 else SITE_B)
            epochs.append(s.epoch)
            await store.release(scn.parcel, s.epoch)
        epochs.append((await store.break_lock(scn.parcel)).epoch)
        epochs.append((await store.acquire(scn.parcel, SITE_A)).epoch)
        assert epochs == [1, 2, 3, 4, 5]

    async def test_concurrent_acquires_have_one_winner(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        sites = [Holder(f"site-{i}", f"host-{i}") for i in range(6)]
        got = await asyncio.gather(*(store.acquire(scn.parcel, h) for h in sites), return_exceptions=True)
        wins = [g for g in got if isinstance(g, LockState)]
        assert len(wins) == 1, got
        assert all(isinstance(g, LockHeld) for g in got if g is not wins[0])
        assert wins[0].epoch == 1
        assert await store.lock_status(scn.parcel) == wins[0]


class TestCommit:
    async def test_commit_first_version(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(2 * MiB)
        await scn.upload(img)
        lock = await store.acquire(scn.parcel, SITE_A)
        m = scn.v1(img)
        before = time.time()
        vi = await store.commit(scn.parcel, scn.req(m, lock.epoch, img, site=""))
        assert isinstance(vi, VersionInfo)
        assert vi.version == 1
        assert vi.site == "site-a"  # defaults to the holder's site
        assert vi.manifest_hash == manifest_hash(m) and vi.manifest_size == len(m)
        assert vi.new_pack_bytes == img.size
        assert before - 5 <= vi.time <= time.time() + 5
        info = await store.parcel(scn.parcel)
        assert info.version == 1 and info.lock.version == 1
        assert info.lock.holder is None and info.lock.epoch == lock.epoch  # release=True
        assert await store.get_manifests(scn.parcel, 1, 1) == [m]
        assert await store.list_versions(scn.parcel) == [vi]

    async def test_replayed_commit_returns_the_same_version(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        lock = await store.acquire(scn.parcel, SITE_A)
        req = scn.req(scn.v1(img), lock.epoch, img)
        first = await store.commit(scn.parcel, req)
        assert await store.commit(scn.parcel, req) == first
        assert await store.list_versions(scn.parcel) == [first]

    async def test_stale_epoch_after_break_changes_nothing(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        lock = await store.acquire(scn.parcel, SITE_A)
        await store.break_lock(scn.parcel)
        with pytest.raises(Conflict):
            await store.commit(scn.parcel, scn.req(scn.v1(img), lock.epoch, img))
        assert (await store.parcel(scn.parcel)).version == 0
        assert await store.list_versions(scn.parcel) == []
        with pytest.raises(NotFound):
            await store.get_manifests(scn.parcel, 1, 1)
        assert await store.locate(scn.parcel, img.tags) == {}  # its packs stay merely staged

    async def test_stale_epoch_on_a_later_version_changes_nothing(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img, m1, _, lock = await scn.commit_v1(release=False)
        before = await state(store, scn.parcel)
        await store.break_lock(scn.parcel)
        v1 = manifest.decode(m1, scn.key, scn.parcel)
        m2 = manifest.encode(parcel=scn.parcel, version=2, master_key=scn.key, vm=VM,
                             keyring=img.keyring, parent=v1, dirty=[])
        with pytest.raises(Conflict) as e:
            await store.commit(scn.parcel, scn.req(m2, lock.epoch, parent=1))
        assert e.value.details.get("epoch") == lock.epoch + 1
        info, versions, mans = await state(store, scn.parcel)
        assert (versions, mans) == before[1:]
        assert info.version == 1 and info.lock.epoch == lock.epoch + 1

    async def test_commit_without_the_lock_conflicts(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        for epoch in (0, 1):
            with pytest.raises(Conflict):
                await store.commit(scn.parcel, scn.req(scn.v1(img), epoch, img))
        assert (await store.parcel(scn.parcel)).version == 0

    async def test_stale_parent_conflicts(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img, m1, vi, lock = await scn.commit_v1(release=False)
        other_v1 = scn.v1(img)  # another site's idea of version 1
        with pytest.raises(Conflict):
            await store.commit(scn.parcel, scn.req(other_v1, lock.epoch, img, parent=0))
        with pytest.raises(Conflict):
            await store.commit(scn.parcel, scn.req(other_v1, lock.epoch, img, parent=2))
        assert await store.list_versions(scn.parcel) == [vi]
        assert await store.get_manifests(scn.parcel, 1, 1) == [m1]
        assert await store.lock_status(scn.parcel) == LockState(scn.parcel, lock.epoch, 1, lock.holder, "")

    @pytest.mark.parametrize("wrong", ["other-parcel", "version-2", "parent-hash"])
    async def test_manifest_header_mismatch_is_an_integrity_error(
        self, store: Store, tmp_path: Path, wrong: str
    ) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        lock = await store.acquire(scn.parcel, SITE_A)
        parent = 0
        if wrong == "other-parcel":
            m = scn.v1(img, parcel=uuid.uuid4())
        elif wrong == "version-2":
            first = manifest.decode(scn.v1(img), scn.key)
            m = manifest.encode(parcel=scn.parcel, version=2, master_key=scn.key, vm=VM,
                                keyring=img.keyring, parent=first, dirty=[0])
        else:
            await store.commit(scn.parcel, scn.req(scn.v1(img), lock.epoch, img, release=False))
            parent = 1
            forked = manifest.decode(scn.v1(img), scn.key)  # a version 1 never committed
            m = manifest.encode(parcel=scn.parcel, version=2, master_key=scn.key, vm=VM,
                                keyring=img.keyring, parent=forked, dirty=[0])
        before = await state(store, scn.parcel)
        with pytest.raises(IntegrityError):
            await store.commit(scn.parcel, scn.req(m, lock.epoch, img, parent=parent, release=True))
        assert await state(store, scn.parcel) == before
        assert (await store.lock_status(scn.parcel)).holder is not None  # not released

    async def test_malformed_manifest_is_refused(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        lock = await store.acquire(scn.parcel, SITE_A)
        good = scn.v1(img)
        for m in (os.urandom(500), good[:-7], b"", good[:50]):
            with pytest.raises(FormatError):
                await store.commit(scn.parcel, scn.req(m, lock.epoch, img))
        assert (await store.parcel(scn.parcel)).version == 0
        assert (await store.commit(scn.parcel, scn.req(good, lock.epoch, img))).version == 1

    async def test_pack_never_uploaded_is_not_found(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(2 * MiB)
        await store.put_pack(scn.parcel, img.pack_ids[0], img.paths[0])  # the second is not
        lock = await store.acquire(scn.parcel, SITE_A)
        with pytest.raises(NotFound):
            await store.commit(scn.parcel, scn.req(scn.v1(img), lock.epoch, img))
        assert (await store.parcel(scn.parcel)).version == 0
        # The failed commit did not make the uploaded pack live either.
        assert await store.locate(scn.parcel, img.tags) == {}
        assert await store.have_packs(scn.parcel, img.pack_ids) == {img.pack_ids[0]}

    @pytest.mark.parametrize("missing", ["random-tag", "staged-not-named", "memory-tag"])
    async def test_added_tags_must_be_in_committed_or_named_packs(
        self, store: Store, tmp_path: Path, missing: str
    ) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(2 * MiB)
        await scn.upload(img)
        lock = await store.acquire(scn.parcel, SITE_A)
        tags = sorted(img.keyring.tags())
        kw: dict[str, Any] = {}
        if missing == "random-tag":
            kw = {"added": [*tags, os.urandom(32)]}
        elif missing == "staged-not-named":
            kw = {"packs": img.pack_ids[:1]}  # the other pack is staged, but not named
        else:
            kw = {"memory": [os.urandom(32)]}
        with pytest.raises(NotFound):
            await store.commit(scn.parcel, scn.req(scn.v1(img), lock.epoch, img, **kw))
        assert (await store.parcel(scn.parcel)).version == 0
        assert await store.locate(scn.parcel, tags) == {}
        # The same commit, complete, then lands.
        vi = await store.commit(scn.parcel, scn.req(scn.v1(img), lock.epoch, img))
        assert vi.version == 1

    async def test_keep_lock_then_delta_version(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img, m1, vi1, lock = await scn.commit_v1(release=False)
        held = await store.lock_status(scn.parcel)
        assert held.holder is not None and held.epoch == lock.epoch and held.version == 1

        # Version 2: chunks 0 and 1 rewritten, a delta manifest, one new pack.
        new = scn.image(2 * 128 * 1024)
        v1 = manifest.decode(m1, scn.key, scn.parcel)
        ring = img.keyring.copy()
        old_tags = {ring.tag_at(0), ring.tag_at(1)}
        ring[0], ring[1] = new.keyring[0], new.keyring[1]
        m2 = manifest.encode(parcel=scn.parcel, version=2, master_key=scn.key, vm=VM,
                             keyring=ring, parent=v1, dirty=[0, 1], site="site-a")
        assert not parse_header(m2).full_keyring
        await scn.upload(new)
        req = scn.req(m2, lock.epoch, new, parent=1, removed=sorted(old_tags))
        vi2 = await store.commit(scn.parcel, req)
        assert (vi2.version, vi2.new_pack_bytes, vi2.manifest_hash) == (2, new.size, manifest_hash(m2))
        assert await store.commit(scn.parcel, req) == vi2  # replayed after the release
        assert await store.list_versions(scn.parcel) == [vi1, vi2]
        assert await store.get_manifests(scn.parcel, 1, 2) == [m1, m2]
        assert await store.get_manifests(scn.parcel, 2, 2) == [m2]
        info = await store.parcel(scn.parcel)
        assert info.version == 2 and info.lock.holder is None and info.lock.epoch == lock.epoch
        chain = [manifest.decode(x, scn.key, scn.parcel) for x in await store.get_manifests(scn.parcel, 1, 2)]
        assert manifest.resolve(chain).keyring == ring
        found = await store.locate(scn.parcel, [ring.tag_at(0), ring.tag_at(1), ring.tag_at(2)])
        assert {e.pack_id for e in found.values()} <= {*img.pack_ids, *new.pack_ids}
        assert len(found) == 3

    async def test_missing_manifests_are_not_found(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img, m1, _, lock = await scn.commit_v1(release=False)
        v1 = manifest.decode(m1, scn.key, scn.parcel)
        m2 = manifest.encode(parcel=scn.parcel, version=2, master_key=scn.key, vm=VM,
                             keyring=img.keyring, parent=v1, dirty=[])
        await store.commit(scn.parcel, scn.req(m2, lock.epoch, parent=1))
        assert await store.get_manifests(scn.parcel, 1, 2) == [m1, m2]
        problems = []
        for first, last in [(1, 3), (3, 3), (0, 1), (2, 1), (-1, 1), (0, 0)]:
            try:
                await raises(NotFound, lambda f=first, la=last: store.get_manifests(scn.parcel, f, la), f"{first}..{last}")
            except pytest.fail.Exception as e:
                problems.append(str(e))
        assert not problems, "\n".join(problems)

    async def test_concurrent_commits_have_one_winner(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        lock = await store.acquire(scn.parcel, SITE_A)
        reqs = [scn.req(scn.v1(img), lock.epoch, img, release=False) for _ in range(4)]
        got = await asyncio.gather(*(store.commit(scn.parcel, r) for r in reqs), return_exceptions=True)
        wins = [g for g in got if isinstance(g, VersionInfo)]
        assert len(wins) == 1, got
        assert all(isinstance(g, Conflict) for g in got if g is not wins[0])
        landed = reqs[got.index(wins[0])].manifest
        assert await store.get_manifests(scn.parcel, 1, 1) == [landed]


class TestFencing:
    async def test_broken_holder_is_fenced_off(
        self, store: Store, second_site_store: Store, tmp_path: Path
    ) -> None:
        site_a, site_b = store, second_site_store
        scn = await Scenario.create(site_a, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        a = await site_a.acquire(scn.parcel, SITE_A)
        broken = await site_b.break_lock(scn.parcel, "site A was stolen")
        assert broken.epoch == a.epoch + 1
        a_req = scn.req(scn.v1(img), a.epoch, img)
        with pytest.raises(Conflict):
            await site_a.commit(scn.parcel, a_req)
        b = await site_b.acquire(scn.parcel, SITE_B)
        assert b.epoch == broken.epoch + 1
        b_m = scn.v1(img)
        vb = await site_b.commit(scn.parcel, scn.req(b_m, b.epoch, img, site="site-b", release=False))
        assert (vb.version, vb.site) == (1, "site-b")
        # A's retry stays refused; its release cannot free B's lock.
        with pytest.raises(Conflict):
            await site_a.commit(scn.parcel, a_req)
        with pytest.raises(Conflict):
            await site_a.release(scn.parcel, a.epoch)
        with pytest.raises(LockHeld):
            await site_a.acquire(scn.parcel, SITE_A)
        assert await site_a.get_manifests(scn.parcel, 1, 1) == [b_m]
        s = await site_a.lock_status(scn.parcel)
        assert s.holder is not None and s.holder.site == "site-b" and s.epoch == b.epoch


# -- the carried lock (DESIGN.md, "Lock record": `suspend --to-usb --carry-lock`) ----------------


async def carried(scn: Scenario) -> tuple[Image, bytes, LockState]:
    """Version 1 committed by SITE_A, which then hands the lock to MEDIUM; the carried lock."""
    img, m1, _, lock = await scn.commit_v1(release=False)
    return img, m1, await scn.store.hand_over(scn.parcel, lock.epoch, MEDIUM)


def next_version(scn: Scenario, img: Image, prev: bytes, site: str) -> bytes:
    """A version after ``prev`` (same disk), as the site named ``site`` would seal it."""
    parent = manifest.decode(prev, scn.key, scn.parcel)
    return manifest.encode(parcel=scn.parcel, version=parent.version + 1, master_key=scn.key, vm=VM,
                           keyring=img.keyring, parent=parent, dirty=[], site=site, time=time.time())


class TestHandOver:
    async def test_hand_over_bumps_the_epoch_and_records_the_medium(self, store: Store, home, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        a = await store.acquire(scn.parcel, SITE_A)
        before = time.time()
        m = await store.hand_over(scn.parcel, a.epoch, MEDIUM)
        assert (m.parcel, m.epoch, m.version) == (scn.parcel, a.epoch + 1, 0)
        assert m.holder is not None
        assert (m.holder.site, m.holder.host, m.holder.user) == ("medium:3f0c9a7e", "KINGSTON-16G",
                                                                 home.name_of("alice"))
        assert m.holder.medium == "3f0c9a7e"
        assert before - 5 <= m.holder.since <= time.time() + 5
        assert await store.lock_status(scn.parcel) == m
        assert (await store.parcel(scn.parcel)).lock == m

    async def test_previous_holder_is_fenced_off(self, store: Store, second_site_store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        img = scn.image(MiB)
        await scn.upload(img)
        a = await store.acquire(scn.parcel, SITE_A)
        m = await store.hand_over(scn.parcel, a.epoch, MEDIUM)
        before = await state(store, scn.parcel)
        with pytest.raises(Conflict) as e:
            await store.commit(scn.parcel, scn.req(scn.v1(img), a.epoch, img))
        assert e.value.details.get("epoch") == m.epoch
        assert "KINGSTON-16G" in str(e.value) and "3f0c9a7e" in str(e.value)
        with pytest.raises(Conflict):
            await store.release(scn.parcel, a.epoch)
        # Another site is told where the lock went, and how to get it back.
        with pytest.raises(LockHeld) as held:
            await second_site_store.acquire(scn.parcel, SITE_B)
        assert "medium KINGSTON-16G" in str(held.value) and "3f0c9a7e" in str(held.value)
        assert "--from-usb" in held.value.hint
        assert held.value.details.get("site") == "medium:3f0c9a7e"
        # Nor does the old holder get it back by acquiring: the medium is not its site.
        with pytest.raises(LockHeld):
            await store.acquire(scn.parcel, SITE_A)
        assert await state(store, scn.parcel) == before
        assert await store.locate(scn.parcel, img.tags) == {}

    async def test_retried_hand_over_is_idempotent(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        a = await store.acquire(scn.parcel, SITE_A)
        m = await store.hand_over(scn.parcel, a.epoch, MEDIUM)
        assert await store.hand_over(scn.parcel, a.epoch, MEDIUM) == m
        # ... but only for the holder it went to.
        with pytest.raises(Conflict):
            await store.hand_over(scn.parcel, a.epoch, SITE_B)
        assert await store.lock_status(scn.parcel) == m

    async def test_wrong_epoch_is_refused_and_changes_nothing(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        await store.acquire(scn.parcel, SITE_B)
        await store.break_lock(scn.parcel)
        a = await store.acquire(scn.parcel, SITE_A)
        assert a.epoch == 3
        for wrong in (a.epoch - 1, a.epoch + 1, 0, a.epoch + 100):
            with pytest.raises(Conflict) as e:
                await store.hand_over(scn.parcel, wrong, MEDIUM)
            assert e.value.details.get("epoch") == a.epoch, wrong
            assert e.value.details.get("site") == "site-a", wrong
            assert "host-a.example" in str(e.value) and "site-a" in str(e.value)
            assert "\n" not in str(e.value)
        assert await store.lock_status(scn.parcel) == a

    async def test_hand_over_of_a_free_lock_is_refused(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        with pytest.raises(Conflict) as e:
            await store.hand_over(scn.parcel, 0, MEDIUM)  # never locked
        assert "nobody holds it" in str(e.value) and e.value.details.get("epoch") == 0
        a = await store.acquire(scn.parcel, SITE_A)
        released = await store.release(scn.parcel, a.epoch)
        with pytest.raises(Conflict):
            await store.hand_over(scn.parcel, a.epoch, MEDIUM)  # released
        assert await store.lock_status(scn.parcel) == released
        b = await store.acquire(scn.parcel, SITE_A)
        broken = await store.break_lock(scn.parcel)
        for epoch in (b.epoch, broken.epoch):
            with pytest.raises(Conflict) as e:
                await store.hand_over(scn.parcel, epoch, MEDIUM)  # broken
            assert "nobody holds it" in str(e.value)
        assert await store.lock_status(scn.parcel) == broken

    async def test_hand_over_to_no_one_is_a_usage_error(self, store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        a = await store.acquire(scn.parcel, SITE_A)
        for nobody in (Holder("", "h"), Holder.for_medium("", "label")):
            with pytest.raises(UsageError):
                await store.hand_over(scn.parcel, a.epoch, nobody)
        assert await store.lock_status(scn.parcel) == a

    @pytest.mark.parametrize("release", [False, True], ids=["sync", "suspend"])
    async def test_commit_under_the_carried_epoch(self, store: Store, second_site_store: Store,
                                                   tmp_path: Path, release: bool) -> None:
        # A site that resumed from the medium with no network commits later under the carried epoch.
        scn = await Scenario.create(store, tmp_path)
        img, m1, carry = await carried(scn)
        site_b = second_site_store
        m2 = next_version(scn, img, m1, "site-b")
        with pytest.raises(Conflict):  # the right epoch, a stale parent
            await site_b.commit(scn.parcel, scn.req(m2, carry.epoch, parent=0, site="site-b"))
        req = scn.req(m2, carry.epoch, parent=1, release=release, site="site-b")
        v2 = await site_b.commit(scn.parcel, req)
        assert (v2.version, v2.site) == (2, "site-b")
        assert await site_b.commit(scn.parcel, req) == v2  # replayed
        after = await site_b.lock_status(scn.parcel)
        assert (after.epoch, after.version) == (carry.epoch, 2)
        assert after.holder == (None if release else carry.holder)
        assert await store.get_manifests(scn.parcel, 1, 2) == [m1, m2]
        if release:
            return
        # Kept: the same site goes on committing, then takes the lock back from the medium.
        m3 = next_version(scn, img, m2, "site-b")
        assert (await site_b.commit(scn.parcel, scn.req(m3, carry.epoch, parent=2, release=False,
                                                        site="site-b"))).version == 3
        mine = await site_b.hand_over(scn.parcel, carry.epoch, SITE_B)
        assert mine.epoch == carry.epoch + 1 and mine.version == 3
        assert mine.holder is not None and mine.holder.site == "site-b" and mine.holder.medium is None
        m4 = next_version(scn, img, m3, "site-b")
        with pytest.raises(Conflict):  # the medium's epoch is fenced off now
            await site_b.commit(scn.parcel, scn.req(m4, carry.epoch, parent=3, site="site-b"))
        v4 = await site_b.commit(scn.parcel, scn.req(m4, mine.epoch, parent=3, site="site-b"))
        assert v4.version == 4
        final = await store.lock_status(scn.parcel)
        assert (final.holder, final.epoch, final.version) == (None, mine.epoch, 4)
        assert [v.version for v in await store.list_versions(scn.parcel)] == [1, 2, 3, 4]

    async def test_carry_again_after_taking_back(self, store: Store, second_site_store: Store, tmp_path: Path) -> None:
        scn = await Scenario.create(store, tmp_path)
        _, _, carry = await carried(scn)
        b = await second_site_store.hand_over(scn.parcel, carry.epoch, SITE_B)
        again = await second_site_store.hand_over(scn.parcel, b.epoch, MEDIUM)  # the same medium, re-used
        assert again.epoch == carry.epoch + 2 and again.holder is not None and again.holder.medium == "3f0c9a7e"
        # The first carry's epoch is two steps behind: neither it nor B's may act.
        for stale in (carry.epoch, b.epoch):
            with pytest.raises(Conflict):
                await store.hand_over(scn.parcel, stale, SITE_A)
            with pytest.raises(Conflict):
                await store.release(scn.parcel, stale)
        assert await store.lock_status(scn.parcel) == again
        broken = await store.break_lock(scn.parcel, "the medium was lost")
        assert broken.holder is None and broken.epoch == again.epoch + 1

    async def test_racing_hand_overs_of_one_carried_epoch_have_one_winner(
        self, home: Any, store: Store, tmp_path: Path
    ) -> None:
        # Sites resuming from copies of one medium each present the carried epoch.
        scn = await Scenario.create(store, tmp_path)
        _, _, carry = await carried(scn)
        clients = [store, *(home.store("alice") for _ in range(3))]
        sites = [Holder(f"site-{i}", f"host-{i}.example") for i in range(len(clients))]
        winners = []
        for rnd in range(4):
            await asyncio.gather(*(c.lock_status(scn.parcel) for c in clients))  # warm the pools
            got = await asyncio.gather(*(c.hand_over(scn.parcel, carry.epoch, h) for c, h in zip(clients, sites)),
                                       return_exceptions=True)
            wins = [i for i, g in enumerate(got) if isinstance(g, LockState)]
            assert len(wins) == 1, f"round {rnd}: {got}"
            w = wins[0]
            winners.append(w)
            won = got[w]
            assert won.epoch == carry.epoch + 1 and won.holder is not None and won.holder.site == f"site-{w}"
            for i, g in enumerate(got):
                if i != w:
                    assert isinstance(g, Conflict), f"round {rnd}, client {i}: {g!r}"
                    assert g.details.get("epoch") == won.epoch and g.details.get("site") == f"site-{w}"
            assert {await c.lock_status(scn.parcel) for c in clients} == {won}
            # The winner carries it away again for the next round.
            carry = await clients[w].hand_over(scn.parcel, won.epoch, MEDIUM)
        assert carry.epoch == 1 + 1 + 2 * 4 and carry.version == 1

    async def test_racing_commits_under_one_carried_epoch_lose_no_version(
        self, home: Any, store: Store, tmp_path: Path
    ) -> None:
        # Two (or more) copies of one medium resumed with no network, then synced at once:
        # the first commit wins, the others are fenced, and nothing that landed is lost.
        scn = await Scenario.create(store, tmp_path)
        img, m1, carry = await carried(scn)
        clients = [store, *(home.store("alice") for _ in range(3))]
        landed = [m1]
        for rnd in range(4):
            await asyncio.gather(*(c.lock_status(scn.parcel) for c in clients))
            mans = [next_version(scn, img, landed[-1], f"site-{i}") for i in range(len(clients))]
            reqs = [scn.req(m, carry.epoch, parent=len(landed), release=False, site=f"site-{i}")
                    for i, m in enumerate(mans)]
            got = await asyncio.gather(*(c.commit(scn.parcel, r) for c, r in zip(clients, reqs)),
                                       return_exceptions=True)
            wins = [i for i, g in enumerate(got) if isinstance(g, VersionInfo)]
            assert len(wins) == 1, f"round {rnd}: {got}"
            w = wins[0]
            assert got[w].version == len(landed) + 1 and got[w].site == f"site-{w}"
            assert all(isinstance(g, Conflict) for i, g in enumerate(got) if i != w), got
            landed.append(mans[w])
            assert await store.get_manifests(scn.parcel, 1, len(landed)) == landed
        # The carried lock is still the medium's; a hand-over and a commit race on it. A
        # hand-over that lands first fences the commit; one that lands second still takes
        # the lock, and the version in its answer tells that site its own state is stale.
        m_next = next_version(scn, img, landed[-1], "site-0")
        got = await asyncio.gather(
            clients[1].hand_over(scn.parcel, carry.epoch, SITE_B),
            clients[0].commit(scn.parcel, scn.req(m_next, carry.epoch, parent=len(landed), release=False)),
            return_exceptions=True,
        )
        assert not any(isinstance(g, Exception) and not isinstance(g, Conflict) for g in got), got
        if isinstance(got[1], VersionInfo):
            landed.append(m_next)
        if isinstance(got[0], LockState):
            assert got[0].version == len(landed)
        assert await store.get_manifests(scn.parcel, 1, len(landed)) == landed
        assert [v.version for v in await store.list_versions(scn.parcel)] == list(range(1, len(landed) + 1))
        final = await store.lock_status(scn.parcel)
        assert final.version == len(landed)
        assert final.epoch == (carry.epoch + 1 if isinstance(got[0], LockState) else carry.epoch)
