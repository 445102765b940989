"""How a run ends when the guest does not wait for `isrsync suspend`: it powers itself
off, or its QEMU dies. Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import os
import signal
import time


def test_guest_poweroff_commits_the_disk_and_next_resume_cold_boots(sites, parcel, state_of) -> None:
    a, name = parcel
    pid = a.parcel_id(name)
    proc, ev, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write before-poweroff still-here") == "GUEST: OK"
    assert con.command("poweroff") == "GUEST: BYE"
    con.close()

    end = a.ended(proc)
    assert end["how"] == "powered-off" and end["committed"] is True and end["version"] == 2, end
    ended_err = proc.stderr
    assert a.qemu_pids() == []
    (info,) = a.json("ls")
    assert info["version"] == 2 and info["holder"] is None, info
    st = state_of(a, pid)
    assert st["meta"]["status"] == "idle" and st["dirty"] == 0 and "memory" not in st["blobs"], st

    # Version 2 has no memory image: B cold-boots it, and the file is on the disk.
    b = sites("b")
    proc, ev, con = b.resume(name)
    assert ev["version"] == 2 and ev["cold_boot"] is True, ev
    con.wait_for("GUEST: READY", 120)
    assert con.command("read before-poweroff") == "GUEST: DATA still-here"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    con.close()
    assert b.json("suspend", name)["version"] == 3
    b.ended(proc)
    # The CLI never shows a traceback (DESIGN.md, "Style"), not even when the guest ends the run.
    assert "Traceback" not in ended_err, ended_err[-3000:]


def test_qemu_killed_keeps_what_the_guest_flushed(sites, parcel, state_of) -> None:
    a, name = parcel
    pid = a.parcel_id(name)
    proc, ev, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write crash-note flushed-before-the-crash") == "GUEST: OK"
    assert con.command("sync") == "GUEST: OK"
    (qemu,) = a.qemu_pids()
    os.kill(qemu, signal.SIGKILL)
    con.close()

    # The run ends by itself (no hang, no traceback) ...
    rc, events, err = proc.finish(120)
    assert "internal error" not in err, err[-3000:]
    assert rc == 0, (rc, err[-2000:])
    end = events[-1]
    assert end["event"] == "ended", events
    # ... and keeps the disk as the guest last flushed it: committed, without a memory
    # image (the memory died with QEMU), the lock released.
    assert end["committed"] is True and end["version"] == 2, end
    (info,) = a.json("ls")
    assert info["version"] == 2 and info["holder"] is None, info
    st = state_of(a, pid)
    assert st["dirty"] == 0 and "memory" not in st["blobs"], st

    proc, ev, con = a.resume(name)
    assert ev["version"] == 2 and ev["cold_boot"] is True, ev
    con.wait_for("GUEST: READY", 120)
    assert con.command("read crash-note") == "GUEST: DATA flushed-before-the-crash"
    time.sleep(0.2)
    con.close()
    assert a.json("suspend", name)["version"] == 3
    a.ended(proc)
    assert "Traceback" not in err, err[-3000:]
