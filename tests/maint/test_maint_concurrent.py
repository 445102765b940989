"""`prune` and `collect_garbage` against a site committing at the same time.

The invariant: a committed version never names a chunk the server cannot
serve. A commit that re-references a chunk whose pack prune has just dropped is
refused with NotFound; the site uploads the chunk again and commits again.

The free-running test uses real threads (a pruner looping in one, the holder
committing in the event loop, with its store's own worker thread), with prune on
the same Repository the store uses and on a second one (a separate SQLite
connection, as `isrsync server prune` in another process is). The deterministic
tests place a concurrent re-upload exactly inside the window between a
deleter's transaction and its unlink.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from maintkit import USER, ZERO, Client, read_version

from isrsync import manifest
from isrsync.errors import IsrError, NotFound
from isrsync.server.maint import check, collect_garbage, prune
from isrsync.server.local import LocalStore
from isrsync.server.repo import Repository
from isrsync.vmspec import VmSpec

KEEP = 2
STEPS = 30


def _kept_from(client: Client, keep: int) -> int:
    head = client.version
    oldest = max(1, head - keep + 1)
    return min([oldest] + [manifest.parse_header(client.versions[v].raw).keyring_base for v in range(oldest, head + 1)])


def _dead_disk_tags(client: Client) -> list[bytes]:
    """Disk tags no version that a prune with KEEP keeps references any more."""
    ever = set().union(*(v.keyring.tags() for v in client.versions.values()))
    live = set().union(*(client.versions[v].tags() for v in range(_kept_from(client, KEEP), client.version + 1)))
    return sorted(ever - live)


@pytest.mark.parametrize("separate", [False, True], ids=["same-repo", "second-connection"])
async def test_prune_is_safe_against_concurrent_commits(
    store: LocalStore, make_client, data_dir: Path, separate: bool
) -> None:
    client = make_client(32, seed=7, full_every=3)
    await client.start()
    rng = client.rng
    await client.commit({i: client.random_plain() for i in range(client.chunks)})
    for _ in range(5):
        await client.commit({i: client.random_plain() for i in rng.sample(range(client.chunks), 8)}, memory_chunks=1)

    prune_repo = Repository(data_dir) if separate else store.repo
    stop = threading.Event()
    gate = threading.Lock()  # held by the pruner while it prunes; the checker takes it to read
    runs = threading.Semaphore(0)
    failures: list[BaseException] = []
    totals = {"runs": 0, "dropped": 0, "compacted": 0}

    def pruner() -> None:
        while not stop.is_set():
            try:
                with gate:
                    r = prune(prune_repo, USER, client.parcel, KEEP)
                totals["runs"] += 1
                totals["dropped"] += r.packs_dropped
                totals["compacted"] += r.packs_compacted
                runs.release()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                failures.append(e)
                return
            time.sleep(0.001)

    t = threading.Thread(target=pruner, name="pruner", daemon=True)
    t.start()
    reused = 0
    try:
        for step in range(STEPS):
            if step % 2 == 0:
                # Let the pruner finish a whole run first, so the dead chunks we
                # are about to re-reference have really been dropped (if their
                # packs went); odd steps race it freely.
                while runs.acquire(blocking=False):
                    pass
                assert runs.acquire(timeout=30), failures
            dead = _dead_disk_tags(client)
            writes = {i: client.random_plain() for i in rng.sample(range(client.chunks), 4)}
            for tag in rng.sample(dead, min(3, len(dead))):
                writes[rng.randrange(client.chunks)] = client.plain_of[tag]
                reused += 1
            if step % 5 == 4:
                writes[rng.randrange(client.chunks)] = ZERO
            await client.commit(writes, memory_chunks=1 if step % 3 == 0 else 0, repair=True)
            # The version just committed is whole, right now: pause the pruner and read it.
            with gate:
                assert await read_version(store, client, client.version) > 0
            assert not failures, failures
    finally:
        stop.set()
        t.join(60)
    assert not t.is_alive()
    assert not failures, failures
    print(f"prune runs {totals}, chunks re-referenced {reused}, commits refused {client.refusals}")
    assert reused > 0
    assert totals["runs"] >= STEPS // 2 and totals["dropped"] > 0, totals
    # The race did happen: some commits named chunks that had been dropped.
    assert client.refusals > 0

    rep = check(store.repo)
    assert rep.ok, rep.problems
    left = [vi.version for vi in await store.list_versions(client.parcel)]
    assert left[-1] == client.version and left == list(range(left[0], client.version + 1))
    for v in left:
        await read_version(store, client, v)
    if separate:
        prune_repo.close()


# -- a re-upload inside a deleter's window ----------------------------------------------


class UnlinkWindow:
    """Run ``during`` when ``deleter`` asks for the path of ``victim`` after the
    row that named it is gone: the moment between its transaction and its unlink.

    ``during`` runs on its own thread (as another process's request would), and
    the deleter waits for it at most a moment: an implementation that holds a
    lock across that window simply makes the re-upload wait until it is over.
    """

    def __init__(self, deleter: Repository, victim: bytes, during) -> None:
        self.fired = False
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self._during = during
        orig = deleter.pack_path

        def hooked(pack_id: bytes) -> Path:
            if pack_id == victim and not self.fired and not deleter._q("SELECT 1 FROM packs WHERE id=?", (pack_id,)):
                self.fired = True
                self.thread = threading.Thread(target=self._run, daemon=True)
                self.thread.start()
                self.thread.join(2.0)
            return orig(pack_id)

        deleter.pack_path = hooked  # type: ignore[method-assign]

    def _run(self) -> None:
        try:
            self._during()
        except BaseException as e:  # noqa: BLE001 - a refused re-upload is a fair outcome
            self.error = e

    def finish(self) -> None:
        assert self.fired, "the re-upload never ran inside the deleter's window"
        assert self.thread is not None
        self.thread.join(90)
        assert not self.thread.is_alive()
        if self.error is not None and not isinstance(self.error, IsrError):
            raise self.error


async def _commit_reusing(client: Client, pack) -> None:
    """Commit a version whose memory image is exactly the chunks of ``pack``,
    naming it; refused with NotFound, the site uploads the pack again and retries."""
    from isrsync import chunk
    from isrsync.manifest import MemoryImage

    ver, packs, req = client.build({0: client.random_plain()})
    plains = [client.plain_of[t] for t in sorted(pack.tags)]
    refs = [chunk.encode(p, client.secret).ref for p in plains]
    mem = MemoryImage.from_refs(len(plains) * chunk.CHUNK_SIZE, refs)
    ver.memory, ver.memory_plain = mem, plains
    ver.raw = req.manifest = manifest.encode(
        parcel=client.parcel, version=ver.number, master_key=client.key, vm=VmSpec(), keyring=ver.keyring,
        parent=client.head, dirty=[0], memory=mem, full_every=client.full_every,
    )
    req.memory = sorted(pack.tags)
    req.packs.append(pack.id)
    await client.upload(packs)
    try:
        await client.store.commit(client.parcel, req)
    except NotFound:
        await client.upload([pack])
        await client.store.commit(client.parcel, req)
    client.versions[ver.number] = ver
    client.head = manifest.decode(ver.raw, client.key, client.parcel)


async def test_reupload_while_prune_drops_the_same_pack(store: LocalStore, make_client, data_dir: Path) -> None:
    """Prune (another process: its own connection) drops a dead pack; the site
    uploads that very pack again (it still has it) between prune's transaction
    and its unlink, then commits a version that uses its chunks. Whatever the
    interleaving, a committed version's chunks must be readable."""
    client = make_client(8, seed=5, full_every=1)
    await client.start()
    await client.commit({i: client.random_plain() for i in range(8)}, memory_chunks=2)
    await client.commit({0: client.random_plain()})
    mem_pack = next(p for p in client.packs.values() if p.tags == client.versions[1].memory.refs.tags())

    deleter = Repository(data_dir)
    window = UnlinkWindow(
        deleter, mem_pack.id, lambda: store.repo.put_pack_file(USER, client.parcel, mem_pack.id, mem_pack.path)
    )
    rep = prune(deleter, USER, client.parcel, 1)
    window.finish()
    deleter.close()
    assert rep.packs_dropped >= 1

    await _commit_reusing(client, mem_pack)
    problems = check(store.repo).problems
    assert not problems, f"a committed version names chunks whose pack file is gone: {problems}"
    await read_version(store, client, client.version)


async def test_reupload_while_gc_collects_the_same_pack(store: LocalStore, make_client, data_dir: Path) -> None:
    """GC expires a staged pack; the site uploads it again inside GC's window and
    commits. Whatever the interleaving, the committed chunks must be readable."""
    client = make_client(8, seed=6)
    await client.start()
    await client.commit({i: client.random_plain() for i in range(8)})
    staged = client.pack([client.random_plain() for _ in range(2)])[1][0]
    await client.upload([staged])

    deleter = Repository(data_dir)
    window = UnlinkWindow(
        deleter, staged.id, lambda: store.repo.put_pack_file(USER, client.parcel, staged.id, staged.path)
    )
    assert collect_garbage(deleter, grace=60, now=time.time() + 3600) > 0
    window.finish()
    deleter.close()

    await _commit_reusing(client, staged)
    problems = check(store.repo).problems
    assert not problems, f"a committed version names chunks whose pack file is gone: {problems}"
    await read_version(store, client, client.version)


async def test_commit_reviving_a_chunk_during_compaction_keeps_it(store: LocalStore, make_client, data_dir: Path) -> None:
    """A commit lands after compaction chose which chunks to copy and before it
    drops the old pack, re-referencing a chunk it did not copy: the old pack must
    stay (it is the chunk's only home), and a later prune compacts it properly."""
    client = make_client(16, seed=8, full_every=1)
    await client.start()
    await client.commit({i: client.random_plain() for i in range(16)})
    base = next(iter(client.packs.values()))
    overwritten = list(range(12))
    await client.commit({i: client.random_plain() for i in overwritten})  # base pack: 4 of 16 live after prune
    revived = client.versions[1].keyring[0].tag
    # v3 writes chunk 0 of v1 back: the site thinks the server has it (it does, now).
    ver, packs, req = client.build({5: client.plain_of[revived]})
    assert not packs and revived in req.added

    deleter = Repository(data_dir)
    landed: list = []
    orig = deleter.pack_path

    def hooked(pack_id: bytes) -> Path:
        if pack_id == base.id and not landed:
            landed.append(store.repo.commit(USER, client.parcel, req))
        return orig(pack_id)

    deleter.pack_path = hooked  # type: ignore[method-assign]
    rep = prune(deleter, USER, client.parcel, 1)
    assert landed, "compaction never read the sparse pack"
    client.versions[ver.number] = ver
    client.head = manifest.decode(ver.raw, client.key, client.parcel)
    assert rep.versions_dropped == 1
    # the old pack stays: it is the revived chunk's only home
    assert rep.packs_compacted == 0 and store.repo.pack_path(base.id).exists()
    problems = check(store.repo).problems
    assert not problems, problems
    await read_version(store, client, 3)

    rep2 = prune(deleter, USER, client.parcel, 1)
    deleter.close()
    assert check(store.repo).ok
    assert not store.repo.pack_path(base.id).exists() and rep2.packs_compacted + rep2.packs_dropped >= 1
    await read_version(store, client, 3)
