"""Fronts SIGKILLed during uploads and commits leave nothing half-done
(12 over a shared --data directory, 30 over S3 with fronts that share nothing
but the database and the bucket).

A steady front B watches while front A (restarted each round) takes an upload
and a commit and is killed at a random moment in them. Afterwards the head is
either the parent or the new version, whole; every version a client was told
had landed is still there; `isrsync server check` over PostgreSQL is clean.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pgkit
from isrsync.errors import IsrError
from isrsync.manifest import manifest_hash
from isrsync.server.maint import sweep_partials
from isrsync.server.repo import Repository
from isrsync.store.base import Holder, VersionInfo

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from srvkit import Chain, verify_chain  # noqa: E402

KILLS = 12


async def test_fronts_killed_mid_commit_lose_nothing(pg_dsn: str, server_factory, stores, tmp_path: Path) -> None:
    data = tmp_path / "shared"
    b = pgkit.with_metadata(server_factory(data=data, extra=["--metadata", pg_dsn]), pg_dsn)
    await _kill_rounds(KILLS, b, lambda k: server_factory(data=data, extra=["--metadata", pg_dsn]),
                       stores, tmp_path, ["--data", str(data), "--metadata", pg_dsn])


async def test_stateless_fronts_over_s3_killed_thirty_times(pg_dsn: str, server_factory, stores,
                                                            tmp_path: Path) -> None:
    """The same with packs in S3 and fronts that share nothing but the database
    and the bucket (each killed front had a --data of its own): every third
    round the client resumes its cut upload through B and commits there, so the
    pieces a killed front recorded are joined by another; at the end the sweep
    leaves no piece behind and check is clean."""
    packs = pgkit.s3_url()
    args = ["--metadata", pg_dsn, "--packs", packs]
    b = pgkit.with_metadata(server_factory(data=tmp_path / "front-b", extra=args), pg_dsn, packs)
    await _kill_rounds(30, b, lambda k: server_factory(data=tmp_path / f"front-a{k}", extra=args),
                       stores, tmp_path, ["--data", str(tmp_path / "front-b"), *args], resume_every=3)
    repo = Repository(tmp_path / "front-b", metadata=pg_dsn, packs=packs)
    try:
        sweep_partials(repo, idle=1, now=time.time() + 10)
        assert repo._q("SELECT COUNT(*) FROM upload_parts") == [(0,)]
        assert list(repo.packs.objects("uploads/")) == []  # type: ignore[attr-defined]
    finally:
        repo.close()


async def _kill_rounds(kills: int, b, start_a, stores, tmp_path: Path, check_args: list[str],
                       resume_every: int = 0) -> None:
    rnd = random.Random(17)
    token = b.add_user("alice")
    sb = stores(b.url, token)
    pid = uuid.uuid4()
    await sb.create_parcel(pid, "killed")
    chain = Chain(pid, disk_chunks=256)
    lock = await sb.acquire(pid, Holder("s", "h"))
    acknowledged: dict[int, bytes] = {}
    landed_after_kill = resumed = from_piece = 0
    for k in range(kills):
        a = start_a(k)
        sa = stores(a.url, token, retries=0)
        ch = chain.make_change(tmp_path / f"k{k}", rnd.randint(4, 24))
        req, _ = chain.request(ch, lock.epoch, site="s")

        async def work() -> VersionInfo:
            if resume_every:
                await _put_in_pieces(a.url, token, pid, ch.pack_id, ch.pack_path.read_bytes())
            else:
                await sa.put_pack(pid, ch.pack_id, ch.pack_path)
            return await sa.commit(pid, req)

        task = asyncio.create_task(work())
        await asyncio.sleep(rnd.uniform(0.0, 0.25))
        a.kill()  # SIGKILL, mid-upload, mid-commit or after it
        try:
            v = await task
            acknowledged[v.version] = manifest_hash(req.manifest)
        except (IsrError, OSError):
            pass
        versions = await sb.list_versions(pid)
        if resume_every and k % resume_every == 0 and not (versions and versions[-1].version == chain.version + 1):
            # The client carries on through B from wherever A's pieces got to.
            from_piece += await _offset(b.url, token, pid, ch.pack_id) > 0
            await sb.put_pack(pid, ch.pack_id, ch.pack_path)
            v = await sb.commit(pid, req)
            acknowledged[v.version] = manifest_hash(req.manifest)
            resumed += 1
            versions = await sb.list_versions(pid)
        head = (await sb.parcel(pid)).head_hash
        if versions and versions[-1].version == chain.version + 1:
            landed_after_kill += versions[-1].version not in acknowledged
            (m,) = await sb.get_manifests(pid, chain.version + 1, chain.version + 1)
            assert manifest_hash(m) == manifest_hash(req.manifest) == head
            chain.landed(m)
        else:
            assert [v.version for v in versions] == list(range(1, chain.version + 1)), versions
    all_m = await sb.get_manifests(pid, 1, chain.version) if chain.version else []
    for v, h in acknowledged.items():
        assert manifest_hash(all_m[v - 1]) == h, f"acknowledged version {v} was lost"
    if all_m:
        verify_chain(all_m, pid, chain.master)
    r = subprocess.run([*pgkit.isrsync_cmd(), "server", "check", *check_args],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    print(f"{kills} kills: {chain.version} versions landed, {len(acknowledged)} acknowledged, "
          f"{landed_after_kill} landed without an answer, {resumed} resumed through another front "
          f"({from_piece} from a piece the killed front recorded)")
    assert chain.version > 0
    if resume_every:
        assert from_piece > 0, "no resume began from a recorded piece: the test did not test that"


PIECES = 4


async def _put_in_pieces(url: str, token: str, pid: uuid.UUID, pack: bytes, raw: bytes) -> None:
    """Upload as a client resuming over a flaky link would: several ranged PUTs."""
    import aiohttp

    step = -(-len(raw) // PIECES)
    async with aiohttp.ClientSession() as http:
        for at in range(0, len(raw), step):
            end = min(len(raw), at + step) - 1
            async with http.put(f"{url}/v1/parcels/{pid}/packs/{pack.hex()}", data=raw[at:end + 1], headers={
                    "Authorization": f"Bearer {token}", "Content-Range": f"bytes {at}-{end}/{len(raw)}"}) as r:
                if r.status not in (201, 202):
                    raise OSError(f"upload answered {r.status}")


async def _offset(url: str, token: str, pid: uuid.UUID, pack: bytes) -> int:
    import aiohttp

    async with aiohttp.ClientSession() as http, http.get(
            f"{url}/v1/parcels/{pid}/uploads/{pack.hex()}", headers={"Authorization": f"Bearer {token}"}) as r:
        body = await r.json()
        return 0 if body["complete"] else int(body["offset"])
