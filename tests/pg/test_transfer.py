"""`isrsync server import` and `export`: a whole repository moves from a data
directory into PostgreSQL and S3 and back, every pack verified on the way;
clients see the same users, tokens, parcels, versions, locks and bytes; a
damaged pack stops the copy with one line and leaves the destination empty."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse
import uuid
from pathlib import Path

import pgkit
from isrsync.server.repo import Repository
from isrsync.store.base import Holder

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from srvkit import Chain, verify_chain  # noqa: E402


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*pgkit.isrsync_cmd(), "server", *args], capture_output=True, text=True, timeout=300)


def _bucket_keys(url: str) -> list[str]:
    import boto3

    u = urllib.parse.urlsplit(url)
    endpoint = dict(urllib.parse.parse_qsl(u.query))["endpoint"]
    got = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").list_objects_v2(Bucket=u.netloc)
    return [o["Key"] for o in got.get("Contents", [])]


async def _fill(srv, stores, tmp_path: Path) -> dict:
    """Two users, three parcels, a few versions, one staged pack, a held lock, a key bundle."""
    made: dict = {"tokens": {}, "parcels": {}}
    for user in ("alice", "bob"):
        token = srv.add_user(user)
        made["tokens"][user] = token
        s = stores(srv.url, token)
        await s.put_key_bundle(f"sealed bundle of {user}".encode(), None)
        for name in ([f"{user}-work", f"{user}-play"] if user == "alice" else [f"{user}-work"]):
            pid = uuid.uuid4()
            await s.create_parcel(pid, name, "q35")
            chain = Chain(pid, disk_chunks=64)
            lock = await s.acquire(pid, Holder(f"site-{name}", "host"))
            for i in range(3):
                ch = chain.make_change(tmp_path / f"{name}-{i}", 6)
                await s.put_pack(pid, ch.pack_id, ch.pack_path)
                req, _ = chain.request(ch, lock.epoch, site=f"site-{name}", release=(i == 2 and user == "bob"))
                await s.commit(pid, req)
                (m,) = await s.get_manifests(pid, i + 1, i + 1)
                chain.landed(m)
            staged = chain.make_change(tmp_path / f"{name}-staged", 3)
            await s.put_pack(pid, staged.pack_id, staged.pack_path)
            made["parcels"][pid] = (user, chain, staged.pack_id)
    return made


async def _same(srv, stores, made: dict) -> None:
    """What clients of ``srv`` see is what they committed to the original."""
    for pid, (user, chain, staged) in made["parcels"].items():
        s = stores(srv.url, made["tokens"][user])
        assert await s.get_key_bundle() == f"sealed bundle of {user}".encode()
        info = await s.parcel(pid)
        assert info.version == 3
        assert (info.lock.holder is None) == (user == "bob")
        manifests = await s.get_manifests(pid, 1, 3)
        verify_chain(manifests, pid, chain.master)
        assert await s.pack_size(pid, staged) is not None  # staged packs move too
        vs = await s.list_versions(pid)
        assert [v.version for v in vs] == [1, 2, 3]


async def test_directory_to_postgresql_and_s3_and_back(pg_dsn: str, server_factory, stores, tmp_path: Path) -> None:
    src = server_factory(data=tmp_path / "dir-home")
    made = await _fill(src, stores, tmp_path)
    src.kill()

    packs = pgkit.s3_url()
    r = _run("import", str(src.data), "--data", str(tmp_path / "front"), "--metadata", pg_dsn,
             "--packs", packs, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert (rep["users"], rep["parcels"], rep["versions"], rep["packs"]) == (2, 3, 9, 12)
    assert rep["verified"] and rep["bytes"] > 0
    assert "password" not in r.stdout + r.stderr
    assert len([k for k in _bucket_keys(packs) if "/packs/" in k]) == 12

    front = pgkit.with_metadata(server_factory(data=tmp_path / "front", extra=[
        "--metadata", pg_dsn, "--packs", packs]), pg_dsn, packs)
    await _same(front, stores, made)
    # The copy serves on: a new commit through the new backend.
    pid, (user, chain, _) = next(iter(made["parcels"].items()))
    s = stores(front.url, made["tokens"][user])
    ch = chain.make_change(tmp_path / "after-import", 4)
    await s.put_pack(pid, ch.pack_id, ch.pack_path)
    req, _ = chain.request(ch, (await s.lock_status(pid)).epoch, site="after")
    assert (await s.commit(pid, req)).version == 4
    front.kill()
    r = _run("check", "--data", str(tmp_path / "front"), "--metadata", pg_dsn, "--packs", packs)
    assert r.returncode == 0, r.stdout + r.stderr

    # And back into a directory, with a progress summary for people.
    r = _run("export", str(tmp_path / "back"), "--data", str(tmp_path / "front"), "--metadata", pg_dsn,
             "--packs", packs)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "copied 2 user(s), 3 parcel(s), 10 version(s) and 13 pack(s)" in r.stdout
    assert "every one verified" in r.stdout
    r = _run("check", "--data", str(tmp_path / "back"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["packs"] == 13, r.stdout + r.stderr
    back = server_factory(data=tmp_path / "back")
    s = stores(back.url, made["tokens"][user])
    verify_chain(await s.get_manifests(pid, 1, 4), pid, chain.master)
    assert await s.get_pack(pid, ch.pack_id) == ch.pack_path.read_bytes()

    # A destination that holds a repository already is refused in one line.
    r = _run("export", str(tmp_path / "back"), "--data", str(tmp_path / "front"), "--metadata", pg_dsn,
             "--packs", packs)
    assert r.returncode != 0
    assert "already holds a repository" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


async def test_a_damaged_pack_is_refused_and_nothing_is_copied(pg_dsn: str, server_factory, stores,
                                                               tmp_path: Path) -> None:
    src = server_factory(data=tmp_path / "dir-home")
    made = await _fill(src, stores, tmp_path)
    src.kill()
    pid, (_, _, staged) = next(iter(made["parcels"].items()))
    victim = Repository(src.data).pack_path(staged)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    victim.write_bytes(bytes(raw))

    packs = pgkit.s3_url()
    r = _run("import", str(src.data), "--data", str(tmp_path / "front"), "--metadata", pg_dsn, "--packs", packs)
    assert r.returncode == 3  # IntegrityError
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith("copying and verifying packs")]
    assert len(lines) == 1, r.stderr  # the progress lines, then one line that says it
    assert f"pack {staged.hex()[:16]}" in lines[0] and "fails its check" in lines[0]
    assert "isrsync server check" in lines[0] and "Traceback" not in r.stderr
    # Nothing landed: no rows, no objects (the packs verified before it are deleted again).
    repo = Repository(tmp_path / "front", metadata=pg_dsn, packs=packs)
    try:
        assert repo._q("SELECT COUNT(*) FROM users") == [(0,)]
        assert repo._q("SELECT COUNT(*) FROM packs") == [(0,)]
    finally:
        repo.close()
    assert [k for k in _bucket_keys(packs) if "/packs/" in k] == []
