"""Versions through the real CLI: sync while the guest runs, resuming an older version,
rollback. Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import time

from sitekit import message_lines


def _counter(con) -> int:
    reply = con.command("counter")
    assert reply.startswith("GUEST: COUNTER "), reply
    return int(reply.split()[-1])


def test_sync_commits_while_the_guest_keeps_running(sites, parcel) -> None:
    a, name = parcel
    proc, ev, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write x x-before-sync") == "GUEST: OK"
    c0 = _counter(con)

    res = a.json("sync", name)
    assert res["version"] == 2, res
    # The guest runs on: same process, counter still moving, disk still usable.
    assert proc.poll() is None
    lock = a.lock(name)
    assert lock["version"] == 2 and lock["holder"]["site"] == a.site_id, lock
    c1 = _counter(con)
    time.sleep(1.0)
    c2 = _counter(con)
    assert c0 <= c1 < c2, (c0, c1, c2)
    assert con.command("read x") == "GUEST: DATA x-before-sync"
    assert con.command("write y y-after-sync") == "GUEST: OK"
    (run,) = a.json("status")["running"]
    assert run["base"] == 2 and run["dirty_chunks"] > 0, run
    con.close()
    res = a.json("suspend", name)
    assert res["committed"] is True and res["version"] == 3, res
    assert a.ended(proc)["how"] == "suspended"

    b = sites("b")
    proc, ev, con = b.resume(name)
    assert ev["version"] == 3 and ev["cold_boot"] is False
    assert con.command("read x") == "GUEST: DATA x-before-sync"
    assert con.command("read y") == "GUEST: DATA y-after-sync"
    con.close()
    assert b.json("suspend", name)["version"] == 4
    b.ended(proc)

    # Version 2 (the sync) has x but not y; its memory image is the one saved by the sync.
    proc, ev, con = b.resume(name, "--version", "2")
    assert ev["version"] == 2 and ev["cold_boot"] is False
    c = _counter(con)
    assert c0 <= c <= c1 + 50, (c0, c, c1)
    assert con.command("read x") == "GUEST: DATA x-before-sync"
    assert con.command("read y") == "GUEST: MISSING"
    con.close()
    res = b.json("suspend", name)
    assert res["committed"] is True and res["version"] == 5, res  # on top of the head, history kept
    b.ended(proc)
    (info,) = b.json("ls")
    assert info["version"] == 5 and info["holder"] is None


def test_rollback_commits_a_version_equal_to_an_older_one(sites, parcel) -> None:
    a, name = parcel
    assert a.boot_and_suspend(name, "write x written-in-v2") == 2

    res = a.json("rollback", name, "1")
    assert res == {"version": 3, "equal_to": 1}, res
    (info,) = a.json("ls")
    assert info["name"] == name and info["version"] == 3 and info["holder"] is None, info

    b = sites("b")
    proc, ev, con = b.resume(name)
    # Version 1 had no memory image, so neither has its copy: a cold boot of v1's disk.
    assert ev["version"] == 3 and ev["cold_boot"] is True, ev
    con.wait_for("GUEST: READY", 120)
    assert con.command("read x") == "GUEST: MISSING"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    con.close()
    assert b.json("suspend", name)["version"] == 4
    b.ended(proc)

    # Rolling back to a version that does not exist is refused and commits nothing.
    r = a.run("rollback", name, "9", check=False)
    assert r.returncode == 5 and "Traceback" not in r.stderr and len(message_lines(r.stderr)) == 1, r.stderr
    (info,) = a.json("ls")
    assert info["version"] == 4 and info["holder"] is None
