"""`prune`: keep the newest versions and the keyring bases they need; every kept
version stays fully readable; dead packs are deleted; sparse packs compacted.

The history is real: each version rewrites a random subset of a disk's chunks,
packs the new ones with pack_stream, seals a delta manifest (a full keyring
every 4 versions) and commits with added/removed computed from the keyrings.
The expected outcome is computed here from what the client wrote, not from the
server's tables.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess

import pytest
from maintkit import USER, ZERO, Client, isrsync_cmd, pack_tags, read_version

from isrsync import manifest
from isrsync.errors import NotFound
from isrsync.server.maint import check, collect_garbage, prune
from isrsync.server.local import LocalStore

DISK_CHUNKS = 48


async def _history(client: Client, versions: int) -> None:
    """v1 is a whole disk (some ZERO chunks); every later version rewrites 4..10
    random chunks (now and then one of them to zeros); some carry a memory image."""
    await client.start()
    rng = client.rng
    n = client.chunks
    await client.commit({i: ZERO if i % 7 == 3 else client.random_plain() for i in range(n)})
    for v in range(2, versions + 1):
        idx = rng.sample(range(n), rng.randint(4, 10))
        writes = {i: client.random_plain() for i in idx}
        if v % 4 == 2:
            writes[idx[0]] = ZERO
        await client.commit(writes, memory_chunks=2 if v % 3 == 0 or v == versions else 0)


def _expected_base(client: Client, keep: int) -> int:
    head = client.version
    oldest = max(1, head - keep + 1)
    return min([oldest] + [manifest.parse_header(client.versions[v].raw).keyring_base for v in range(oldest, head + 1)])


def _classify(client: Client, live: set[bytes]) -> tuple[list, list, list]:
    dead, sparse, kept = [], [], []
    for p in client.packs.values():
        total = sum(e.length for e in p.info.entries)
        alive = sum(e.length for e in p.info.entries if e.tag in live)
        (dead if alive == 0 else sparse if alive < 0.5 * total else kept).append(p)
    return dead, sparse, kept


def _du(store: LocalStore) -> int:
    return sum(f.stat().st_size for f in (store.repo.root / "packs").glob("*/*"))


@pytest.mark.parametrize("versions,base", [(12, 9), (11, 9)])
async def test_prune_keeps_newest_and_their_bases_and_all_stay_readable(
    store: LocalStore, make_client, versions: int, base: int
) -> None:
    client = make_client(DISK_CHUNKS, seed=versions)
    await _history(client, versions)
    assert check(store.repo).ok
    head, keep = versions, 3
    # full keyrings at 1, 5, 9 (full_every=4): a kept delta may need an older base
    assert [v for v in client.versions if manifest.parse_header(client.versions[v].raw).full_keyring] == [1, 5, 9]
    assert _expected_base(client, keep) == base

    live = set().union(*(client.versions[v].tags() for v in range(base, head + 1)))
    dead, sparse, kept = _classify(client, live)
    # The history must exercise every outcome, or the test proves little.
    assert dead and sparse and kept, (len(dead), len(sparse), len(kept))
    before = _du(store)
    kept_bytes = {p.id: hashlib.blake2b(store.repo.pack_path(p.id).read_bytes(), digest_size=32).digest() for p in kept}

    rep = prune(store.repo, USER, client.parcel, keep)

    assert rep.kept_from == base
    assert rep.versions_dropped == base - 1
    assert [vi.version for vi in await store.list_versions(client.parcel)] == list(range(base, head + 1))
    for v in range(base, head + 1):
        raw = (await store.get_manifests(client.parcel, v, v))[0]
        assert manifest.parse_header(raw).keyring_base >= base
    for v in range(1, base):
        with pytest.raises(NotFound):
            await store.get_manifests(client.parcel, v, v)

    # Dead packs: gone from the tables and from the disk.
    assert rep.packs_dropped == len(dead)
    for p in dead:
        assert not store.repo.pack_path(p.id).exists()
        assert not store.repo._q("SELECT 1 FROM packs WHERE id=?", (p.id,))
    # Sparse packs: replaced by a pack holding exactly their live chunks.
    assert rep.packs_compacted == len(sparse)
    for p in sparse:
        assert not store.repo.pack_path(p.id).exists()
        survivors = p.tags & live
        where = await store.locate(client.parcel, survivors)
        assert set(where) == survivors
        (new_id,) = {e.pack_id for e in where.values()}
        assert new_id not in client.packs
        assert pack_tags(store.repo.pack_path(new_id)) == survivors
    # Everything else is untouched, byte for byte.
    for p in kept:
        assert hashlib.blake2b(store.repo.pack_path(p.id).read_bytes(), digest_size=32).digest() == kept_bytes[p.id]

    assert rep.bytes_freed == sum(p.info.size for p in dead + sparse) > 0
    assert _du(store) < before
    rep2 = check(store.repo)
    assert rep2.ok, rep2.problems
    assert rep2.versions == head - base + 1

    # Every kept version (bases included) resolves from the store and reads back.
    for v in range(base, head + 1):
        assert await read_version(store, client, v) > 0

    # A second prune finds nothing more to do; keep=1 still keeps the head's base.
    again = prune(store.repo, USER, client.parcel, keep)
    assert (again.versions_dropped, again.packs_dropped, again.packs_compacted, again.bytes_freed) == (0, 0, 0, 0)
    one = prune(store.repo, USER, client.parcel, 1)
    assert one.kept_from == manifest.parse_header(client.versions[head].raw).keyring_base == base
    assert one.versions_dropped == 0

    # Life goes on: new commits on the pruned parcel, a later prune, all readable.
    for _ in range(4):
        idx = client.rng.sample(range(DISK_CHUNKS), 6)
        await client.commit({i: client.random_plain() for i in idx})
    later = prune(store.repo, USER, client.parcel, 2)
    assert later.kept_from == _expected_base(client, 2) and later.versions_dropped > 0
    assert check(store.repo).ok
    for v in range(later.kept_from, client.version + 1):
        await read_version(store, client, v)


async def test_prune_keep_everything_changes_nothing(store: LocalStore, make_client) -> None:
    client = make_client(16, seed=3)
    await _history(client, 6)
    files = sorted(f.name for f in (store.repo.root / "packs").glob("*/*"))
    rep = prune(store.repo, USER, client.parcel, 6)
    assert (rep.kept_from, rep.versions_dropped, rep.packs_dropped, rep.packs_compacted, rep.bytes_freed) == (
        1, 0, 0, 0, 0)
    # While every version is kept every chunk ever committed is live: nothing moves.
    assert sorted(f.name for f in (store.repo.root / "packs").glob("*/*")) == files
    with pytest.raises(ValueError):
        prune(store.repo, USER, client.parcel, 0)
    with pytest.raises(NotFound):
        prune(store.repo, "mallory", client.parcel, 1)


async def test_prune_leaves_staged_packs_to_gc(store: LocalStore, make_client) -> None:
    client = make_client(16, seed=4)
    await _history(client, 5)
    staged = client.pack([client.random_plain() for _ in range(3)])[1]
    await client.upload(staged)
    prune(store.repo, USER, client.parcel, 1)
    assert store.repo.pack_path(staged[0].id).exists()
    assert await store.have_packs(client.parcel, [staged[0].id]) == {staged[0].id}
    assert check(store.repo).ok


async def test_cli_prune(store: LocalStore, make_client) -> None:
    client = make_client(DISK_CHUNKS, seed=12)
    await _history(client, 12)
    live = set().union(*(client.versions[v].tags() for v in range(9, 13)))
    dead, sparse, _ = _classify(client, live)
    r = await asyncio.to_thread(
        subprocess.run,
        [*isrsync_cmd(), "server", "prune", USER, "p", "--keep", "3", "--data", str(store.repo.root), "--json"],
        check=False, capture_output=True, text=True, timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["kept_from"] == 9 and out["versions_dropped"] == 8
    assert out["packs_dropped"] == len(dead) and out["packs_compacted"] == len(sparse)
    assert out["bytes_freed"] == sum(p.info.size for p in dead + sparse)
    assert check(store.repo).ok
    assert collect_garbage(store.repo) == 0
    for v in range(9, 13):
        await read_version(store, client, v)
