"""The lookaside policy with another site's cache directory as a source (paper section 7.4),
end to end through the real CLI with a real guest. Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import shutil
import time


def _sources(site) -> dict[str, dict]:
    (run,) = site.json("status")["running"]
    return {s["name"]: s for s in run["sources"]}


def test_resume_with_another_sites_cache_as_lookaside_fetches_almost_nothing_from_the_server(
    sites, parcel, live_server, tmp_path
) -> None:
    a, name = parcel
    proc, ev, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note lookaside-note") == "GUEST: OK"
    time.sleep(1.0)
    con.close()
    assert a.json("suspend", name)["version"] == 2
    a.ended(proc)

    # Site B resumes with site A's cache as a lookaside source: A made the parcel
    # and suspended it, so A's cache holds every chunk B needs.
    b = sites("b")
    before = live_server.pack_bytes_sent()
    proc, ev, con = b.resume(name, "--policy", "lookaside", "--lookaside", str(a.cache))
    assert ev["policy"] == "lookaside" and ev["cold_boot"] is False, ev
    assert con.command("read note") == "GUEST: DATA lookaside-note"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    assert con.command("sha note").startswith("GUEST: SHA ")
    src = _sources(b)
    look = src[f"dir:{a.cache.resolve()}"]
    assert look["kind"] == "cache-dir" and look["bad"] == 0, src
    assert look["hits"] > 50 and look["bytes"] > 4 << 20, src
    assert src["server"]["hits"] == 0, src
    # The server's own count: the resume took next to nothing from it (the
    # manifests and the lock, no pack data).
    assert live_server.pack_bytes_sent() - before < 64 << 10, live_server.pack_bytes_sent() - before
    # `isrsync status` says which source served what, for people too.
    human = b.run("status").stdout
    # A long name is folded over several lines of its cell: join the first cells.
    folded = "".join(line.split("│")[1].strip() for line in human.splitlines() if line.startswith("│"))
    assert "cache-dir" in human and f"dir:{a.cache.resolve()}" in folded, human
    listed = b.json("sources")
    assert [r["name"] for r in listed][:2] == ["cache", f"dir:{a.cache.resolve()}"], listed
    con.close()
    res = b.json("suspend", name)
    assert res["committed"] is True and res["version"] == 3, res
    b.ended(proc)


def _damaged_copy(src, dest) -> None:
    """A copy of a cache with every chunk file's bytes flipped past its headers."""
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.lock", "*-shm", "*-wal"))
    for f in [*(dest / "segments").iterdir(), *(dest / "packs").iterdir()]:
        data = bytearray(f.read_bytes())
        for i in range(64, len(data), 512):
            data[i] ^= 0xFF
        f.write_bytes(bytes(data))


def test_sources_added_and_withdrawn_while_running_and_a_damaged_directory_only_fails_to_help(
    sites, parcel, tmp_path
) -> None:
    a, name = parcel
    # The guest powers off at A: version 2 has no memory image, so B boots cold
    # and reads its files from the disk, not from a restored page cache.
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("fill big 4") == "GUEST: OK"
    want = con.command("sha big")
    assert want.startswith("GUEST: SHA "), want
    assert con.command("poweroff") == "GUEST: BYE"
    con.close()
    assert a.ended(proc)["version"] == 2
    bad = tmp_path / "damaged-cache"
    _damaged_copy(a.cache, bad)

    b = sites("b")
    proc, ev, con = b.resume(name, "--policy", "lookaside")
    assert ev["cold_boot"] is True, ev
    con.wait_for("GUEST: READY", 120)
    assert set(_sources(b)) == {"cache", "server"}
    # Added while the guest runs: the damaged copy answers, every answer fails its
    # tag check, and the guest still reads the right bytes (from the server).
    added = b.json("sources", "add", str(bad))
    assert added["kind"] == "cache-dir", added
    assert con.command("sha big") == want
    src = _sources(b)
    damaged = src[added["name"]]
    assert damaged["bad"] > 0 and damaged["hits"] == 0, src
    assert src["server"]["hits"] > 0, src
    # Withdrawn: gone from the list; a directory that is not a cache is refused with one line.
    b.run("sources", "withdraw", added["name"])
    assert added["name"] not in _sources(b)
    r = b.run("sources", "add", str(tmp_path), check=False)
    assert r.returncode == 2 and "not an isrsync cache directory" in r.stderr and "Traceback" not in r.stderr, r.stderr
    # A directory that vanishes after it was added only fails to help.
    gone = tmp_path / "gone-cache"
    shutil.copytree(a.cache, gone, ignore=shutil.ignore_patterns("*.lock", "*-shm", "*-wal"))
    b.json("sources", "add", str(gone))
    shutil.rmtree(gone)
    assert con.command("fill more 2") == "GUEST: OK"
    assert con.command("sha big") == want
    con.close()
    res = b.json("suspend", name)
    assert res["committed"] is True, res
    b.ended(proc)
