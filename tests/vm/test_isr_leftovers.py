"""Nothing left behind (issue "What the user sees and can recover", part 5): QEMU dies with
the `isrsync resume` that started it, however that ends, and run directories go with their
run; one a killed run left is swept at the next start. Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import os
import signal
import time

from sitekit import message_lines


def _gone(pids: list[int], within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]:
            return True
        time.sleep(0.1)
    return False


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def _run_dirs(site) -> list[str]:
    return sorted(p.name for p in site.runtime.glob("run-*"))


def test_a_killed_resume_takes_its_qemu_along_and_its_run_dir_is_swept(sites, parcel) -> None:
    a, name = parcel
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    con.close()
    qemus = a.qemu_pids()
    assert len(qemus) == 1, qemus
    assert len(_run_dirs(a)) == 1

    os.kill(proc.pid, signal.SIGKILL)  # no suspend, no cleanup: the runner is just gone
    proc.finish(30)
    assert _gone(qemus, 10), f"QEMU {qemus} outlived the isrsync that ran it"
    assert len(_run_dirs(a)) == 1  # nobody has swept it yet

    # The next resume sweeps the stale directory and makes its own; its end removes that too.
    proc, ev, con = a.resume(name)
    assert ev["cold_boot"] is True, ev  # the crashed run had no memory image to restore
    con.wait_for("GUEST: READY", 120)
    con.close()
    assert len(_run_dirs(a)) == 1
    assert a.json("suspend", name)["committed"] is True
    a.ended(proc)
    assert _run_dirs(a) == [] and a.qemu_pids() == []


def test_a_second_resume_of_a_running_parcel_is_one_line(sites, parcel) -> None:
    a, name = parcel
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    con.close()
    r = a.run("resume", name, "--serial", str(a.runtime / "other.sock"), check=False, timeout=60)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "already running" in r.stderr and len(message_lines(r.stderr)) == 1, r.stderr
    assert len(_run_dirs(a)) == 1 and a.json("status")["running"]
    assert a.json("suspend", name)["committed"] is True
    a.ended(proc)
