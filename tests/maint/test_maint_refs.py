"""The tag references that prune and GC rely on must cost what a commit changed.

Every commit records the tags it adds and closes the ones it removes in the
``refs`` table; prune reads liveness from it. DESIGN.md: "the cost of committing
a version must grow with the number of dirty chunks, not the disk size". Here
two parcels commit the same 20-chunk delta, one over a disk with 100 written
chunks and one over 3000; the work SQLite does for the commit (virtual machine
steps, counted with a progress handler: deterministic, unlike a clock) must
not grow with the disk.
"""

from __future__ import annotations

from maintkit import USER, Client

from isrsync import manifest
from isrsync.server.maint import check, prune
from isrsync.server.local import LocalStore

DIRTY = 20


async def _written(client: Client, written: int) -> None:
    await client.start(f"disk{written}")
    await client.commit({i: client.sparse_plain() for i in range(written)})


async def _steps_of_delta(store: LocalStore, client: Client) -> int:
    idx = client.rng.sample(range(100), DIRTY)  # same shape of change on both disks
    ver, packs, req = client.build({i: client.sparse_plain() for i in idx})
    assert len(req.removed) == DIRTY and len(req.added) == DIRTY
    await client.upload(packs)
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0

    db = store.repo._db
    db.set_progress_handler(count, 100)
    try:
        store.repo.commit(USER, client.parcel, req)
    finally:
        db.set_progress_handler(None, 100)
    client.versions[ver.number] = ver
    client.head = manifest.decode(ver.raw, client.key, client.parcel)
    return steps


async def test_commit_bookkeeping_does_not_grow_with_the_disk(store: LocalStore, make_client) -> None:
    small, big = make_client(3000, seed=1), make_client(3000, seed=2)
    await _written(small, 100)
    await _written(big, 3000)
    s = min([await _steps_of_delta(store, small) for _ in range(3)])
    b = min([await _steps_of_delta(store, big) for _ in range(3)])
    assert b < 2 * s, (
        f"a {DIRTY}-chunk commit costs {b} SQLite steps (x100) over 3000 written chunks and {s} over 100: "
        "closing a removed tag scans every open reference of the parcel"
    )
    # and the bookkeeping is right: prune keeps exactly what the kept versions use
    rep = prune(store.repo, USER, big.parcel, 1)
    assert rep.kept_from == 1  # full_every=4: the head's keyring base
    assert check(store.repo).ok
