"""Partial uploads shared through PostgreSQL and S3 (issue 17, part 4).

Two fronts share only the database and the bucket: each has a ``--data``
directory of its own. An upload begun on one resumes on the other, a body cut
on one is kept for the other, a front SIGKILLed mid-body leaves the upload at
its last recorded piece, two fronts appending the same piece at once give one
winner, and the sweep removes idle pieces and objects no row names.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pgkit
from isrsync.server.maint import sweep_partials
from isrsync.server.repo import Repository
from isrsync.store.base import Holder

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from srvkit import Chain  # noqa: E402


def _s3(url: str):
    import boto3

    u = urllib.parse.urlsplit(url)
    endpoint = dict(urllib.parse.parse_qsl(u.query))["endpoint"]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1"), u.netloc, u.path.strip("/")


def _keys(url: str, under: str) -> list[str]:
    s3, bucket, prefix = _s3(url)
    got = s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{under}")
    return [o["Key"] for o in got.get("Contents", [])]


def _two_fronts(server_factory, pg_dsn: str, tmp_path: Path):
    packs = pgkit.s3_url()
    fs = [pgkit.with_metadata(server_factory(data=tmp_path / f"front-{n}", extra=[
        "--metadata", pg_dsn, "--packs", packs]), pg_dsn, packs) for n in "ab"]
    return fs, packs


def _local_partials(*fronts) -> list[Path]:
    return [p for f in fronts for p in (f.data / "uploads").rglob("*") if p.is_file()]


async def _offset(http, front, pid, pack: bytes, token: str) -> int:
    async with http.get(f"{front.url}/v1/parcels/{pid}/uploads/{pack.hex()}",
                        headers={"Authorization": f"Bearer {token}"}) as r:
        body = await r.json()
        assert not body["complete"], body
        return body["offset"]


async def _raw_put_start(front, pid, pack: bytes, token: str, start: int, total: int, body: bytes,
                         declared: int) -> asyncio.StreamWriter:
    """Send a PUT whose Content-Range declares ``declared`` bytes but send only ``body``."""
    host, port = front.url.removeprefix("http://").split(":")
    _, w = await asyncio.open_connection(host, int(port))
    w.write((f"PUT /v1/parcels/{pid}/packs/{pack.hex()} HTTP/1.1\r\nHost: {host}\r\n"
             f"Authorization: Bearer {token}\r\nContent-Length: {declared}\r\n"
             f"Content-Range: bytes {start}-{start + declared - 1}/{total}\r\n\r\n").encode() + body)
    await w.drain()
    return w


async def _until(pred, what: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not await pred():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.1)


async def test_upload_resumes_on_a_front_that_shares_only_database_and_bucket(
        pg_dsn: str, server_factory, stores, tmp_path: Path) -> None:
    import aiohttp

    (a, b), packs = _two_fronts(server_factory, pg_dsn, tmp_path)
    assert a.data != b.data
    token = a.add_user("alice")
    sa, sb = stores(a.url, token), stores(b.url, token)
    pid = uuid.uuid4()
    await sb.create_parcel(pid, "resume")
    chain = Chain(pid, disk_chunks=64)
    ch = chain.make_change(tmp_path / "c", 16)
    raw = ch.pack_path.read_bytes()
    third = len(raw) // 3
    url = f"/v1/parcels/{pid}/packs/{ch.pack_id.hex()}"
    hdr = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as http:
        async with http.put(a.url + url, data=raw[:third], headers={
                **hdr, "Content-Range": f"bytes 0-{third - 1}/{len(raw)}"}) as r:
            assert r.status == 202, await r.text()
        assert await _offset(http, b, pid, ch.pack_id, token) == third
        # The piece is in the bucket, not in either front's directory.
        assert len(_keys(packs, "uploads/")) == 1
        assert _local_partials(a, b) == []
        # The second third through B, the rest by the client's own resume through A.
        async with http.put(b.url + url, data=raw[third:2 * third], headers={
                **hdr, "Content-Range": f"bytes {third}-{2 * third - 1}/{len(raw)}"}) as r:
            assert r.status == 202, await r.text()
        assert await _offset(http, a, pid, ch.pack_id, token) == 2 * third
    await sa.put_pack(pid, ch.pack_id, ch.pack_path)
    assert a.requests("PUT", "/packs/") + a.requests("POST", "/packs/") >= 2
    req, _ = chain.request(ch, (await sb.acquire(pid, Holder("s", "h"))).epoch, site="s")
    assert (await sb.commit(pid, req)).new_pack_bytes == len(raw)
    assert await sb.get_pack(pid, ch.pack_id) == raw
    # Joined and placed: the pieces and their rows are gone.
    assert _keys(packs, "uploads/") == []
    repo = Repository(a.data, metadata=pg_dsn, packs=packs)
    try:
        assert repo._q("SELECT COUNT(*) FROM upload_parts") == [(0,)]
    finally:
        repo.close()


async def test_cut_body_is_kept_and_a_killed_front_leaves_the_last_piece(
        pg_dsn: str, server_factory, stores, tmp_path: Path) -> None:
    import aiohttp

    (a, b), packs = _two_fronts(server_factory, pg_dsn, tmp_path)
    token = a.add_user("alice")
    sb = stores(b.url, token)
    pid = uuid.uuid4()
    await sb.create_parcel(pid, "cut")
    chain = Chain(pid, disk_chunks=64)
    ch = chain.make_change(tmp_path / "c", 32)
    raw = ch.pack_path.read_bytes()
    q = len(raw) // 4
    async with aiohttp.ClientSession() as http:
        # A body cut by the client: what arrived at A is kept, and B sees it.
        w = await _raw_put_start(a, pid, ch.pack_id, token, 0, len(raw), raw[:q], declared=len(raw))
        await asyncio.sleep(0.3)
        w.close()

        async def cut_kept() -> bool:
            return await _offset(http, b, pid, ch.pack_id, token) == q
        await _until(cut_kept, "the cut body's bytes were not kept")
        # Now A dies in the middle of the next body: what it held only in its
        # temporary file is lost, the upload stays at the last recorded piece.
        w = await _raw_put_start(a, pid, ch.pack_id, token, q, len(raw), raw[q:2 * q], declared=len(raw) - q)
        await _until(lambda: _nonempty_tmp(a), "front A never began to receive")
        a.kill()
        w.close()
        assert await _offset(http, b, pid, ch.pack_id, token) == q
    await sb.put_pack(pid, ch.pack_id, ch.pack_path)
    req, _ = chain.request(ch, (await sb.acquire(pid, Holder("s", "h"))).epoch, site="s")
    assert (await sb.commit(pid, req)).version == 1
    r = subprocess.run([*pgkit.isrsync_cmd(), "server", "check", "--data", str(b.data), "--metadata", pg_dsn,
                        "--packs", packs], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert _keys(packs, "uploads/") == []


async def _nonempty_tmp(front) -> bool:
    return any(p.name.startswith(".recv-") and p.stat().st_size > 0 for p in _local_partials(front))


async def test_two_fronts_appending_the_same_piece_one_wins(
        pg_dsn: str, server_factory, stores, tmp_path: Path) -> None:
    import aiohttp

    (a, b), packs = _two_fronts(server_factory, pg_dsn, tmp_path)
    token = a.add_user("alice")
    await stores(b.url, token).create_parcel(pid := uuid.uuid4(), "race")
    ch = Chain(pid, disk_chunks=64).make_change(tmp_path / "c", 16)
    raw = ch.pack_path.read_bytes()
    half = len(raw) // 2
    url = f"/v1/parcels/{pid}/packs/{ch.pack_id.hex()}"
    hdr = {"Authorization": f"Bearer {token}", "Content-Range": f"bytes 0-{half - 1}/{len(raw)}"}
    async with aiohttp.ClientSession() as http:
        async def put(front):
            async with http.put(front.url + url, data=raw[:half], headers=hdr) as r:
                return r.status, await r.json()
        for _ in range(3):
            results = await asyncio.gather(put(a), put(b), put(a), put(b))
            statuses = sorted(s for s, _ in results)
            assert statuses.count(202) == 1, results
            assert set(statuses) <= {202, 409}, results
            assert all(body["details"]["offset"] == half for s, body in results if s == 409), results
            assert await _offset(http, b, pid, ch.pack_id, token) == half
            assert len(_keys(packs, "uploads/")) == 1  # the losers' objects are deleted
            repo = Repository(a.data, metadata=pg_dsn, packs=packs)
            try:
                assert sweep_partials(repo, idle=1, now=time.time() + 10) == 1
            finally:
                repo.close()
            assert await _offset(http, a, pid, ch.pack_id, token) == 0


async def test_sweep_drops_idle_pieces_and_objects_no_row_names(
        pg_dsn: str, server_factory, stores, tmp_path: Path) -> None:
    import aiohttp

    (a, b), packs = _two_fronts(server_factory, pg_dsn, tmp_path)
    token = a.add_user("alice")
    await stores(b.url, token).create_parcel(pid := uuid.uuid4(), "sweep")
    ch = Chain(pid, disk_chunks=64).make_change(tmp_path / "c", 8)
    raw = ch.pack_path.read_bytes()
    async with aiohttp.ClientSession() as http:
        async with http.put(f"{a.url}/v1/parcels/{pid}/packs/{ch.pack_id.hex()}", data=raw[:100], headers={
                "Authorization": f"Bearer {token}", "Content-Range": f"bytes 0-99/{len(raw)}"}) as r:
            assert r.status == 202
    # What a front killed between writing a piece and recording it leaves behind.
    s3, bucket, prefix = _s3(packs)
    s3.put_object(Bucket=bucket, Key=f"{prefix}/uploads/alice/{ch.pack_id.hex()}/stray", Body=b"x" * 10)
    repo = Repository(b.data, metadata=pg_dsn, packs=packs)
    try:
        assert sweep_partials(repo, idle=3600) == 0  # nothing is idle yet
        assert len(_keys(packs, "uploads/")) == 2
        assert sweep_partials(repo, idle=60, now=time.time() + 120) == 2
        assert _keys(packs, "uploads/") == []
        assert repo._q("SELECT COUNT(*) FROM upload_parts") == [(0,)]
    finally:
        repo.close()
