"""Disconnected operation through the real CLI: the home server goes away mid-session.

DESIGN.md, "Lock record": there is no lease timeout, a user may work disconnected
for hours. A suspend that cannot reach the server stays local with the lock still
held; the parcel can be resumed again at that site while offline; `isrsync sync`
commits it when the server is back. Fixtures are in tests/vm/conftest.py.
"""

from __future__ import annotations

import time


def _counter(con) -> int:
    reply = con.command("counter")
    assert reply.startswith("GUEST: COUNTER "), reply
    return int(reply.split()[-1])


def test_suspend_with_the_server_down_stays_local_and_syncs_later(
    sites, parcel, live_server, server_factory, state_of
) -> None:
    a, name = parcel
    pid = a.parcel_id(name)
    proc, ev, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write offline-1 written-before-the-server-died") == "GUEST: OK"
    epoch = a.lock(name)["epoch"]
    time.sleep(1.0)
    c1 = _counter(con)
    assert c1 > 0
    con.close()

    port = live_server.port
    live_server.stop()  # SIGTERM: the home server is gone

    res = a.json("suspend", name)
    assert res["committed"] is False and res["reason"], res
    end = a.ended(proc)
    assert end["how"] == "suspended" and end["committed"] is False, end
    st = state_of(a, pid)
    assert st["meta"]["status"] == "suspended-local" and st["meta"]["epoch"] == epoch, st
    assert st["dirty"] > 0 and "memory" in st["blobs"], st

    # Still offline: resume the local state again; memory and disk come back.
    proc, ev, con = a.resume(name)
    assert ev["cold_boot"] is False and ev["version"] == 1 and ev["local_changes"] is True, ev
    c2 = _counter(con)
    assert c1 <= c2 < c1 + 400, (c1, c2)
    assert con.command("read offline-1") == "GUEST: DATA written-before-the-server-died"
    assert con.command("write offline-2 written-while-offline") == "GUEST: OK"
    time.sleep(0.5)
    c3 = _counter(con)
    assert c3 > c2
    con.close()
    res = a.json("suspend", name)
    assert res["committed"] is False, res
    a.ended(proc)
    assert state_of(a, pid)["meta"]["status"] == "suspended-local"

    # The server comes back on the same address, with the same data.
    srv = server_factory(data=live_server.data, extra=["--listen", f"127.0.0.1:{port}"])
    assert srv.port == port
    lock = a.lock(name)
    assert lock["holder"] is not None and lock["holder"]["site"] == a.site_id, lock
    assert lock["epoch"] == epoch and lock["version"] == 1, lock

    res = a.json("sync", name)
    assert res["committed"] is True and res["version"] == 2, res
    lock = a.lock(name)
    assert lock["holder"] is None and lock["version"] == 2, lock
    st = state_of(a, pid)
    assert st["meta"]["status"] == "idle" and st["dirty"] == 0 and "memory" not in st["blobs"], st

    # Another site resumes what was done offline: both files, and the counter goes on.
    b = sites("b")
    proc, ev, con = b.resume(name)
    assert ev["version"] == 2 and ev["cold_boot"] is False, ev
    c4 = _counter(con)
    assert c3 <= c4 < c3 + 400, (c3, c4)
    assert con.command("read offline-1") == "GUEST: DATA written-before-the-server-died"
    assert con.command("read offline-2") == "GUEST: DATA written-while-offline"
    con.close()
    res = b.json("suspend", name)
    assert res["committed"] is True and res["version"] == 3
    b.ended(proc)


def test_a_crash_after_an_offline_resume_never_restores_the_stale_image(
    sites, parcel, live_server, state_of
) -> None:
    """Offline: suspend locally, resume that image, write, crash. The saved image is
    older than the disk now: the next resume must cold-boot on the surviving disk
    changes, never restore the stale memory over them."""
    import os
    import signal

    a, name = parcel
    pid = a.parcel_id(name)
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    con.close()
    live_server.stop()
    assert a.json("suspend", name)["committed"] is False
    a.ended(proc)
    assert "memory" in state_of(a, pid)["blobs"]

    proc, ev, con = a.resume(name)
    assert ev["cold_boot"] is False  # the local image, once
    assert "memory" not in state_of(a, pid)["blobs"]  # consumed: it will not be restored twice
    assert con.command("write after-image written-after-the-image") == "GUEST: OK"
    assert con.command("sync") == "GUEST: OK"
    con.close()
    # Crash: the resume process and its QEMU die without a word.
    os.kill(proc.pid, signal.SIGKILL)
    for q in a.qemu_pids():
        os.kill(q, signal.SIGKILL)
    proc.kill()
    time.sleep(0.5)

    proc, ev, con = a.resume(name)
    assert ev["cold_boot"] is True, ev
    con.wait_for("GUEST: READY", 120)
    assert con.command("read after-image") == "GUEST: DATA written-after-the-image"
    con.close()
    assert a.json("suspend", name)["committed"] is False  # still offline
    a.ended(proc)
