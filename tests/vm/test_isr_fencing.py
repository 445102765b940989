"""Fencing through the real CLI: a lock broken from another site fences the old holder off.

DESIGN.md, "Lock record": break bumps the epoch, so the old holder's later commit
is refused and its local changes stay recoverable at that site, never silently
merged. Fixtures (``sites``, ``parcel``, ``state_of``) are in tests/vm/conftest.py.
"""

from __future__ import annotations

import time

from sitekit import message_lines


def _counter(con) -> int:
    reply = con.command("counter")
    assert reply.startswith("GUEST: COUNTER "), reply
    return int(reply.split()[-1])


def _fence_a(sites, parcel):
    """A resumes version 1 and writes a note; B breaks A's lock; A's suspend is refused."""
    a, name = parcel
    proc_a, ev, con = a.resume(name)
    assert ev["version"] == 1
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note written-at-a") == "GUEST: OK"
    held = a.lock(name)
    assert held["holder"]["site"] == a.site_id

    b = sites("b")
    broken = b.json("lock", "break", name, "--yes", "--reason", "site a was stolen")
    assert broken["epoch"] > held["epoch"]
    after = b.lock(name)
    assert after["holder"] is None and after["version"] == 1

    con.close()
    r = a.run("suspend", name, check=False, timeout=180)
    assert r.returncode == 7, (r.returncode, r.stdout, r.stderr)
    msg = r.stderr.strip()
    assert len(message_lines(msg)) == 1, msg
    assert "Traceback" not in msg and "kept" in msg, msg
    # The resume process ends (QEMU was stopped for the suspend) without a traceback.
    _, _, err = proc_a.finish(120)
    assert "Traceback" not in err, err[-3000:]
    return a, b, name, held, broken


def test_fenced_suspend_is_refused_and_local_changes_are_kept(sites, parcel, state_of) -> None:
    a, b, name, held, broken = _fence_a(sites, parcel)
    pid = a.parcel_id(name)

    # Nothing on the server changed: still version 1, nobody holds the lock.
    (info,) = a.json("ls")
    assert info["version"] == 1 and info["holder"] is None and info["epoch"] == broken["epoch"]
    # A still has everything the refused suspend saved: the disk changes and the memory image.
    st = state_of(a, pid)
    assert st["meta"]["status"] == "fenced", st  # kept, refused, never merged
    assert st["meta"]["epoch"] == held["epoch"], st
    assert st["dirty"] > 0, st
    assert "memory" in st["blobs"], f"the memory image of the refused suspend was dropped: {st}"

    # B can take the parcel over: it resumes version 1 and A's note is not there.
    proc_b, ev, con_b = b.resume(name)
    assert ev["version"] == 1 and ev["cold_boot"] is True
    con_b.wait_for("GUEST: READY", 120)
    assert con_b.command("read note") == "GUEST: MISSING"
    assert con_b.command("read hello.txt") == "GUEST: DATA made at init"

    # A drops its stale changes; B's lock is not touched by that.
    dropped = a.json("discard", name, "--yes")
    assert dropped["dirty_chunks_dropped"] > 0 and dropped["released_lock"] is False, dropped
    st = state_of(a, pid)
    assert st["dirty"] == 0 and "memory" not in st["blobs"] and st["meta"]["status"] == "idle", st
    lock = b.lock(name)
    assert lock["holder"]["site"] == b.site_id

    assert con_b.command("write note written-at-b") == "GUEST: OK"
    con_b.close()
    res = b.json("suspend", name)
    assert res["committed"] is True and res["version"] == 2
    assert b.ended(proc_b)["how"] == "suspended"
    (info,) = b.json("ls")
    assert info["version"] == 2 and info["holder"] is None


def test_fenced_site_cannot_resume_its_changes_until_it_discards_them(sites, parcel, state_of) -> None:
    a, _, name, _, _ = _fence_a(sites, parcel)
    pid = a.parcel_id(name)

    # A's changes were made under an epoch that no longer holds: resuming them is refused,
    # and the refusal must not leave the parcel locked by A (nothing runs there).
    r = a.run("resume", name, check=False, timeout=180)
    assert r.returncode == 7, (r.returncode, r.stderr)
    msg = r.stderr.strip()
    assert len(message_lines(msg)) == 1 and "Traceback" not in msg and "fenced" in msg, msg
    lock = a.lock(name)
    assert lock["holder"] is None, f"a refused resume left the lock held: {lock}"
    assert state_of(a, pid)["dirty"] > 0

    # After a discard, A resumes the server's version 1: its note was never merged.
    a.json("discard", name, "--yes")
    proc_a, ev, con = a.resume(name)
    assert ev["version"] == 1 and ev["cold_boot"] is True and ev["local_changes"] is False
    con.wait_for("GUEST: READY", 120)
    assert con.command("read note") == "GUEST: MISSING"
    time.sleep(0.5)
    assert _counter(con) >= 0
    con.close()
    res = a.json("suspend", name)
    assert res["committed"] is True and res["version"] == 2
    a.ended(proc_a)


def test_fenced_changes_are_recovered_by_a_fork(sites, parcel, state_of) -> None:
    a, b, name, held, broken = _fence_a(sites, parcel)
    st = a.json("status")
    (kept,) = st["local"]
    assert kept["status"] == "fenced" and f"isrsync fork {name}" in kept["next"], kept

    res = a.json("fork", name, "rescued")
    assert res["name"] == "rescued" and res["version"] == 1 and res["base"] == 1, res
    assert res["dirty_chunks"] > 0 and res["memory_image"] is True, res
    # The original is untouched: still version 1 on the server, still fenced here.
    assert {p["name"]: p["version"] for p in a.json("ls")} == {name: 1, "rescued": 1}
    assert state_of(a, a.parcel_id(name))["meta"]["status"] == "fenced"

    # Another site resumes the fork where A's refused suspend left off: its note is there.
    proc, ev, con = b.resume("rescued")
    assert ev["version"] == 1 and ev["cold_boot"] is False, ev
    assert con.command("read note") == "GUEST: DATA written-at-a"
    con.close()
    assert b.json("suspend", "rescued")["version"] == 2
    b.ended(proc)
    # And A may now drop its fenced copy: nothing it wrote is lost.
    assert a.json("discard", name, "--yes")["dirty_chunks_dropped"] > 0
