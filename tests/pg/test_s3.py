"""Packs in S3 (moto's standalone server on loopback) behind PostgreSQL metadata:
range reads through a front, prune deleting objects after its re-check, check
reading every pack back, and addresses refused with one line."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pytest

import pgkit
from isrsync.errors import UsageError
from isrsync.server.maint import collect_garbage
from isrsync.server.repo import Repository
from isrsync.store.base import Holder

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from srvkit import Chain  # noqa: E402


def _objects(url: str) -> set[str]:
    import boto3

    u = urllib.parse.urlsplit(url)
    endpoint = dict(urllib.parse.parse_qsl(u.query))["endpoint"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    got = s3.list_objects_v2(Bucket=u.netloc, Prefix=u.path.strip("/") + "/packs/")
    return {o["Key"].rsplit("/", 1)[-1] for o in got.get("Contents", [])}


async def test_ranges_prune_and_check_over_s3(pg_dsn: str, server_factory, stores, tmp_path: Path) -> None:
    import aiohttp

    packs = pgkit.s3_url()
    srv = pgkit.with_metadata(
        server_factory(data=tmp_path / "d", extra=["--metadata", pg_dsn, "--packs", packs]), pg_dsn, packs)
    token = srv.add_user("alice")
    s = stores(srv.url, token)
    pid = uuid.uuid4()
    await s.create_parcel(pid, "s3")
    chain = Chain(pid, disk_chunks=64)
    lock = await s.acquire(pid, Holder("s", "h"))
    ids = []
    for i in range(4):
        ch = chain.make_change(tmp_path / f"c{i}", 8, start=0)
        await s.put_pack(pid, ch.pack_id, ch.pack_path)
        req, _ = chain.request(ch, lock.epoch, site="s")
        await s.commit(pid, req)
        (m,) = await s.get_manifests(pid, i + 1, i + 1)
        chain.landed(m)
        ids.append((ch.pack_id, ch.pack_path.read_bytes()))
    assert {p.hex() for p, _ in ids} <= _objects(packs)
    pack, raw = ids[0]
    url = f"{srv.url}/v1/parcels/{pid}/packs/{pack.hex()}"
    hdr = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(url, headers=hdr) as r:
            assert r.status == 200 and await r.read() == raw
        async with http.get(url, headers={**hdr, "Range": "bytes=10-99"}) as r:
            assert r.status == 206 and await r.read() == raw[10:100]
            assert r.headers["Content-Range"] == f"bytes 10-99/{len(raw)}"
        async with http.get(url, headers={**hdr, "Range": "bytes=-7"}) as r:
            assert r.status == 206 and await r.read() == raw[-7:]
        async with http.get(url, headers={**hdr, "Range": f"bytes={len(raw)}-"}) as r:
            assert r.status == 416
    assert await s.get_pack(pid, pack, 5, 50) == raw[5:55]
    args = ["--data", str(srv.data), "--metadata", pg_dsn, "--packs", packs]
    r = subprocess.run([*pgkit.isrsync_cmd(), "server", "prune", "alice", "s3", "--keep", "1", "--json", *args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["kept_from"] >= 1
    # A pack uploaded and never committed: GC (grace 0) deletes its object.
    stray = chain.make_change(tmp_path / "stray", 4)
    await s.put_pack(pid, stray.pack_id, stray.pack_path)
    assert stray.pack_id.hex() in _objects(packs)
    repo = Repository(srv.data, metadata=pg_dsn, packs=packs)
    try:
        assert collect_garbage(repo, grace=0) >= 1
        recorded = {bytes(r[0]).hex() for r in repo._q("SELECT id FROM packs")}
    finally:
        repo.close()
    # Exactly the packs the rows still name are left in the bucket.
    assert stray.pack_id.hex() not in recorded and _objects(packs) == recorded
    r = subprocess.run([*pgkit.isrsync_cmd(), "server", "check", *args], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "all good" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("url", ["s3://", "http://bucket/x", "s3://key:secret@bucket/p", "s3://b/p?endpont=x"])
def test_bad_packs_addresses_are_refused_with_one_line(url: str, tmp_path: Path, pg_dsn: str) -> None:
    with pytest.raises(UsageError) as e:
        Repository(tmp_path / "d", create=True, metadata=pg_dsn, packs=url)
    assert "\n" not in e.value.message and "secret" not in str(e.value)


async def test_s3_packs_beside_the_embedded_sqlite(tmp_path: Path) -> None:
    from isrsync.server.local import LocalStore

    packs = pgkit.s3_url()
    s = LocalStore.open(tmp_path / "d", "alice", create=True, create_user=True, packs=packs)
    try:
        pid = uuid.uuid4()
        await s.create_parcel(pid, "p")
        ch = Chain(pid, disk_chunks=16).make_change(tmp_path / "c", 4)
        await s.put_pack(pid, ch.pack_id, ch.pack_path)
        raw = ch.pack_path.read_bytes() if ch.pack_path.exists() else None
        assert (tmp_path / "d" / "store.db").is_file() and ch.pack_id.hex() in _objects(packs)
        got = await s.get_pack(pid, ch.pack_id)
        assert len(got) == await s.pack_size(pid, ch.pack_id)
        if raw is not None:
            assert got == raw
    finally:
        await s.close()
