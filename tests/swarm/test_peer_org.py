"""A swarm restricted to one's organisation (issue 12, part 6): SSL torrents under a CA
derived from the shared swarm secret (isrsync/swarm/org.py).

Real libtorrent sessions on loopback. A seeder of the organisation holds two
packs. A site with the same secret (its own session certificate) reads every
chunk from it. Three outsiders get nothing and the seeder uploads them no
payload byte: a site without a secret (plain torrents), a bare libtorrent
session that has the organisation's SSL torrent (the CA *certificate* is public,
it is in the torrent) with a certificate of its own making, and a site with a
different secret.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import libtorrent as lt
import pytest
from test_peer_vanish import PackHome
from test_torrent_pack import write_pack

from isrsync.errors import UsageError
from isrsync.swarm.org import org_tls, read_secret, write_secret
from isrsync.swarm.peer import PeerSource
from isrsync.swarm.session import SwarmSession, SwarmSettings
from isrsync.swarm.torrent import make_torrent

SECRET = "correct horse battery staple, lab 3"


def settings(secret: str | None) -> SwarmSettings:
    return SwarmSettings(interface="127.0.0.1", org=org_tls(secret) if secret else None)


def test_the_ca_is_a_function_of_the_secret_and_the_secret_is_kept_private(tmp_path: Path) -> None:
    a, b, c = org_tls(SECRET), org_tls(SECRET), org_tls(SECRET + "!")
    assert a.ca_pem == b.ca_pem and a.fingerprint == b.fingerprint
    assert a.cert_pem != b.cert_pem  # each session signs its own certificate
    assert c.ca_pem != a.ca_pem
    assert SECRET.encode() not in a.ca_pem
    write_secret(tmp_path, SECRET)
    assert (tmp_path / "swarm-secret").stat().st_mode & 0o077 == 0
    assert read_secret(tmp_path) == SECRET
    with pytest.raises(UsageError):
        write_secret(tmp_path, "short")
    (tmp_path / "swarm-secret").write_text("x")
    with pytest.raises(UsageError):  # never falls back to an open swarm
        read_secret(tmp_path)


async def _seeded(tmp_path: Path):
    made = [write_pack(tmp_path / f"made-{k}") for k in range(2)]
    torrents = {info.pack_id: await make_torrent(path, info.pack_id) for info, path in made}
    seeder = await SwarmSession(tmp_path / "seeder", settings(SECRET)).start()
    for info, path in made:
        seeder.file_of(info.pack_id).write_bytes(path.read_bytes())
        await seeder.add(torrents[info.pack_id], seed=True)
    home = PackHome([i for i, _ in made], {p: t.data for p, t in torrents.items()})
    return made, torrents, seeder, home


async def _uploaded(ses: SwarmSession) -> int:
    return await ses.uploaded()


async def _read_all(tmp_path: Path, name: str, secret: str | None, made, home, port: int) -> dict[bytes, bytes]:
    site = await SwarmSession(tmp_path / name, settings(secret)).start()
    source = PeerSource(site, home, uuid.uuid4(), read_timeout=2.0, idle_timeout=1.0)  # type: ignore[arg-type]
    try:
        source.add_peer("127.0.0.1", port)
        return await source.get_many([e.tag for info, _ in made for e in info.entries])
    finally:
        await source.close()
        await site.close()


async def test_an_insider_reads_everything_outsiders_get_nothing(tmp_path: Path) -> None:
    made, torrents, seeder, home = await _seeded(tmp_path)
    try:
        tags = {e.tag for info, _ in made for e in info.entries}
        for name, secret in (("plain", None), ("other-org", SECRET + " (another lab)")):
            got = await _read_all(tmp_path, name, secret, made, home, seeder.port)
            assert got == {}, f"an outsider ({name}) read {len(got)} chunks"
        assert await _uploaded(seeder) == 0

        # A bare libtorrent client with the organisation's SSL torrent and a certificate
        # signed by a CA of its own (it has the CA certificate, not the CA key).
        info, _ = made[0]
        sealed = org_tls(SECRET).seal(torrents[info.pack_id])
        mine = org_tls("an outsider's own CA, not the lab's")
        out = lt.session({"listen_interfaces": "127.0.0.1:0s", "enable_dht": False, "enable_lsd": False,
                          "enable_upnp": False, "enable_natpmp": False})
        atp = lt.add_torrent_params()
        atp.ti = sealed.torrent_info()
        atp.save_path = str(tmp_path / "bare")
        h = out.add_torrent(atp)
        h.set_ssl_certificate_buffer(mine.cert_pem, mine.key_pem, "")
        for _ in range(30):
            try:
                h.connect_peer(("127.0.0.1", seeder.port))
                break
            except RuntimeError:
                await asyncio.sleep(0.05)
        await asyncio.sleep(3.0)
        st = h.status()
        assert st.num_pieces == 0 and st.total_payload_download == 0
        del out
        assert await _uploaded(seeder) == 0

        got = await _read_all(tmp_path, "insider", SECRET, made, home, seeder.port)
        assert set(got) == tags
        assert await _uploaded(seeder) > sum(len(v) for v in got.values()) * 0.9
    finally:
        await seeder.close()
