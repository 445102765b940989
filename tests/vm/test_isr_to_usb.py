"""`isrsync suspend --to-usb` end to end with a real guest (paper section 7): the suspend
copies its memory image and changed chunks to a medium while it uploads, and another
site resuming with that medium as lookaside takes the memory image from it, not from
the server. Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import subprocess
import sys


def _sneakernet(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sneakernet.cli", *args], check=True, capture_output=True)


def _sources(site) -> dict[str, dict]:
    (run,) = site.json("status")["running"]
    return {s["name"]: s for s in run["sources"]}


def test_suspend_to_usb_then_a_resume_elsewhere_reads_memory_from_the_key(sites, parcel, live_server, tmp_path) -> None:
    a, name = parcel
    key = tmp_path / "key"
    key.mkdir()
    _sneakernet("format", str(key), "--label", "travel")
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note carried-on-a-key") == "GUEST: OK"
    con.close()
    res = a.json("suspend", name, "--to-usb", str(key))
    assert res["committed"] is True and res["version"] == 2, res
    m = res["medium"]
    assert m["published"] is True and m["problem"] is None and m["chunks"] > 20 and m["bytes"] > 1 << 20, m
    a.ended(proc)

    b = sites("b")
    before = live_server.pack_bytes_sent()
    manifests = live_server.requests("GET", "/manifests")
    proc, ev, con = b.resume(name, "--policy", "lookaside", "--lookaside", str(key), "--no-watch-media")
    assert ev["cold_boot"] is False, ev
    # The key carried the manifest chain too: checked against the server's head hash, not fetched.
    assert live_server.requests("GET", "/manifests") == manifests
    assert con.command("read note") == "GUEST: DATA carried-on-a-key"
    src = _sources(b)
    (medium,) = [s for n, s in src.items() if s["kind"] == "medium"]
    assert medium["bad"] == 0 and medium["hits"] >= m["chunks"] // 2, src
    from_server = live_server.pack_bytes_sent() - before
    # The memory image came from the key; the server sent only what the guest
    # read of its unchanged disk.
    assert medium["bytes"] > from_server, (medium, from_server)
    con.close()
    assert b.json("suspend", name)["committed"] is True
    b.ended(proc)


def test_a_medium_that_cannot_take_the_copy_never_stops_the_suspend(sites, parcel, tmp_path) -> None:
    a, name = parcel
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    con.close()
    # Not a medium: refused before anything happens, the guest runs on.
    r = a.run("suspend", name, "--to-usb", str(tmp_path), check=False)
    assert r.returncode == 2 and "no .isrsync/ medium" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert a.json("status")["running"], "the guest must still run"
    # A medium too small for the memory image: the copy is dropped with one line,
    # the suspend commits, and the medium keeps what it held.
    key = tmp_path / "small-key"
    key.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(key)], check=True)
    try:
        _sneakernet("format", str(key), "--label", "small")
        r = a.run("suspend", name, "--to-usb", str(key))
        assert "was dropped" in r.stderr and "full" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert "suspended: version 2 committed" in r.stdout, r.stdout
        assert not [p for p in (key / ".isrsync").rglob("*") if p.is_file() and ".tmp" in p.name]
    finally:
        subprocess.run(["umount", "-l", str(key)], check=False)
    a.ended(proc)


def test_suspend_to_usb_with_no_network_copies_to_the_key_and_uploads_at_the_next_sync(
    sites, parcel, live_server, server_factory, tmp_path
) -> None:
    a, name = parcel
    key = tmp_path / "key"
    key.mkdir()
    _sneakernet("format", str(key), "--label", "offline")
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note written-offline") == "GUEST: OK"
    con.close()
    port = live_server.port
    live_server.stop()  # no network from here on

    res = a.json("suspend", name, "--to-usb", str(key))
    assert res["committed"] is False and res["reason"], res
    m = res["medium"]
    assert m["published"] is True and m["problem"] is None and m["chunks"] > 20 and m["bytes"] > 1 << 20, m
    a.ended(proc)

    # The server is back: the next sync uploads what the suspend could not.
    srv = server_factory(data=live_server.data, extra=["--listen", f"127.0.0.1:{port}"])
    assert srv.port == port
    res = a.json("sync", name)
    assert res["committed"] is True and res["version"] == 2, res

    # The key helps another site resume that version: its memory image is on it.
    b = sites("b")
    before = srv.pack_bytes_sent()
    proc, ev, con = b.resume(name, "--policy", "lookaside", "--lookaside", str(key), "--no-watch-media")
    assert ev["version"] == 2 and ev["cold_boot"] is False, ev
    assert con.command("read note") == "GUEST: DATA written-offline"
    (medium,) = [s for s in _sources(b).values() if s["kind"] == "medium"]
    assert medium["bad"] == 0 and medium["hits"] >= m["chunks"] // 2, medium
    assert medium["bytes"] > srv.pack_bytes_sent() - before
    con.close()
    assert b.json("suspend", name)["committed"] is True
    b.ended(proc)


def test_a_stale_key_never_harms_its_manifests_are_refused_and_its_chunks_still_help(
    sites, parcel, live_server, tmp_path
) -> None:
    a, name = parcel
    key = tmp_path / "key"
    key.mkdir()
    _sneakernet("format", str(key), "--label", "stale")
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note on-the-key") == "GUEST: OK"
    con.close()
    assert a.json("suspend", name, "--to-usb", str(key))["version"] == 2
    a.ended(proc)
    # The parcel moves on without the key: version 3 is on the server only.
    proc, _, con = a.resume(name)
    assert con.command("write note after-the-key") == "GUEST: OK"
    con.close()
    assert a.json("suspend", name)["version"] == 3
    a.ended(proc)

    b = sites("b")
    manifests = live_server.requests("GET", "/manifests")
    proc, ev, con = b.resume(name, "--policy", "lookaside", "--lookaside", str(key), "--no-watch-media")
    assert ev["version"] == 3 and ev["cold_boot"] is False, ev
    # The key's chain ends at version 2, not at the head the server names: fetched instead.
    assert live_server.requests("GET", "/manifests") > manifests
    assert con.command("read note") == "GUEST: DATA after-the-key"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    (medium,) = [s for s in _sources(b).values() if s["kind"] == "medium"]
    assert medium["bad"] == 0 and medium["errors"] == 0, medium
    con.close()
    assert b.json("suspend", name)["committed"] is True
    b.ended(proc)
