"""The whole ISR cycle through the real CLI: a real home server on loopback, two
sites (two caches, two configs), a real guest under QEMU, its memory and disk
moving from site A to site B."""

from __future__ import annotations

import json
import time


def test_memory_and_disk_move_from_site_a_to_site_b(sites, parcel) -> None:
    a, name = parcel
    proc_a, ev, con = a.resume(name)
    assert ev["cold_boot"] is True and ev["version"] == 1
    con.wait_for("GUEST: READY", 120)
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    assert con.command("write note written-at-a") == "GUEST: OK"
    time.sleep(1.0)
    c1 = int(con.command("counter").split()[-1])
    assert c1 > 0
    con.close()
    res = json.loads(a.run("suspend", name, "--json").stdout)
    assert res["committed"] is True and res["version"] == 2
    # A cold-booted guest: all its RAM is new (kept by address, not in QEMU's stream).
    assert res["memory_new_chunks"] > 50 and res["memory_kept_chunks"] == 0
    assert a.ended(proc_a)["how"] == "suspended"

    b = sites("b")  # empty cache: everything comes from the home server
    proc_b, ev, con = b.resume(name)
    assert ev["cold_boot"] is False and ev["version"] == 2
    assert ev["memory"] == "lazy"  # the guest runs once its device state is in; RAM follows
    c2 = int(con.command("counter").split()[-1])
    # Memory came along: the counter continues from where it was, not from 0.
    assert c1 <= c2 < c1 + 50, (c1, c2)
    assert con.command("read note") == "GUEST: DATA written-at-a"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"

    # While B runs, A cannot resume: refused with where and since when.
    r = a.run("resume", name, check=False, timeout=60)
    assert r.returncode == 6, r.stderr
    assert "in use on" in r.stderr and "Traceback" not in r.stderr

    status = json.loads(b.run("status", "--json").stdout)
    (run,) = status["running"]
    assert {s["name"]: s for s in run["sources"]}["server"]["hits"] > 0  # B's cache started empty
    con.close()
    res = json.loads(b.run("suspend", "--json").stdout)
    assert res["committed"] is True and res["version"] == 3
    # RAM the guest left alone since the resume keeps its chunks: most of it.
    assert res["memory_kept_chunks"] > res["memory_new_chunks"], res
    assert b.ended(proc_b)["how"] == "suspended"
    listing = json.loads(a.run("ls", "--json").stdout)
    assert listing[0]["version"] == 3 and listing[0]["holder"] is None
