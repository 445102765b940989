"""Local state visible and actionable (issue "What the user sees and can recover", part 2):
after a run is killed, `isrsync status` shows what this site kept and the command that
moves it forward, and `isrsync sync` commits it without resuming. Fixtures are in
tests/vm/conftest.py."""

from __future__ import annotations

import os
import signal


def test_a_killed_run_is_listed_and_sync_commits_it_without_a_resume(sites, parcel, live_server) -> None:
    a, name = parcel
    pid = a.parcel_id(name)
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write kept written-before-the-kill") == "GUEST: OK"
    con.close()
    os.kill(proc.pid, signal.SIGKILL)
    proc.finish(30)

    st = a.json("status")
    assert st["running"] == [], st
    (kept,) = st["local"]
    assert (kept["parcel"], kept["name"], kept["status"], kept["base"]) == (pid, name, "running", 1), kept
    assert kept["dirty_chunks"] > 0 and kept["memory_image"] is False, kept
    assert f"isrsync sync {name}" in kept["next"], kept
    human = a.run("status").stdout
    assert "ended without a suspend" in human and f"isrsync sync {name}" in human, human

    asked = live_server.requests("GET", f"/v1/parcels/{name}")
    res = a.json("sync", name)
    assert res["version"] == 2, res
    # The name of a parcel held here is known here: offline, asking would cost the retries.
    assert live_server.requests("GET", f"/v1/parcels/{name}") == asked
    assert a.json("status")["local"] == []
    assert a.lock(name)["holder"] is None  # released: another site may take it

    b = sites("b")
    proc, ev, con = b.resume(name)
    assert ev["version"] == 2 and ev["cold_boot"] is True, ev
    con.wait_for("GUEST: READY", 120)
    assert con.command("read kept") == "GUEST: DATA written-before-the-kill"
    con.close()
    assert b.json("suspend", name)["committed"] is True
    b.ended(proc)


def test_resume_says_it_resumes_local_changes_not_the_version(sites, parcel) -> None:
    import subprocess
    import time

    from sitekit import isrsync_argv

    a, name = parcel
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write kept before-the-kill") == "GUEST: OK"
    con.close()
    os.kill(proc.pid, signal.SIGKILL)
    proc.finish(30)

    p = subprocess.Popen([*isrsync_argv(), "resume", name, "--serial", str(a.runtime / "ser2.sock")],
                         env={**a.env, "COLUMNS": "200"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a.procs.append(p)
    seen = []
    deadline = time.monotonic() + 120
    assert p.stdout is not None
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith("running;"):
            break
    text = "".join(seen)
    assert "resumed this site's local changes on top of version 1" in text, text
    assert a.json("suspend", name)["version"] == 2
    p.wait(120)


_SYNC_WITH_PROGRESS = """
import asyncio, json, sys
from isrsync.site.cache import open_cache
from isrsync.site.control import ask_sync, running

async def main():
    with open_cache(None) as cache:
        ((_, sock),) = running(cache.site_id)
    seen = []
    res = await ask_sync(sock, lambda stream, done, total: seen.append([stream, done, total]))
    print(json.dumps({"version": res.version, "progress": seen}))

asyncio.run(main())
"""


def test_sync_reports_upload_progress_on_the_control_socket(sites, parcel) -> None:
    import json
    import subprocess
    import sys

    a, name = parcel
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("fill big 8") == "GUEST: OK"
    r = subprocess.run([sys.executable, "-c", _SYNC_WITH_PROGRESS], env=a.env, capture_output=True, text=True,
                       timeout=300, check=True)
    out = json.loads(r.stdout)
    assert out["version"] == 2
    ups = [p for p in out["progress"] if p[0] == "upload"]
    assert ups, out
    assert ups[-1][1] == ups[-1][2] and ups[-1][2] >= 8 << 20, ups[-1]  # all of the new data, counted as sent
    assert [p[1] for p in ups] == sorted(p[1] for p in ups)
    con.close()
    assert a.json("suspend", name)["committed"] is True
    a.ended(proc)


def test_a_baseline_resume_shows_its_fetch_on_a_terminal(sites, parcel) -> None:
    """The baseline policy fetches the whole parcel before the guest runs: on a terminal
    that is a progress bar with bytes, a rate and the time left (issue 13, part 1)."""
    import pty
    import re
    import select
    import subprocess
    import time

    from sitekit import isrsync_argv

    a, name = parcel
    b = sites("b")  # an empty cache: everything is fetched
    master, slave = pty.openpty()
    p = subprocess.Popen([*isrsync_argv(), "resume", name, "--policy", "baseline",
                          "--serial", str(b.runtime / "ser.sock")],
                         env={**b.env, "COLUMNS": "120", "TERM": "xterm"}, stdin=subprocess.DEVNULL,
                         stdout=slave, stderr=slave)
    os.close(slave)
    b.procs.append(p)
    seen = b""
    deadline = time.monotonic() + 120
    try:
        while b"running;" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:
                    break
        text = seen.decode(errors="replace")
        assert "running;" in text, text[-2000:]
        assert "fetching the parcel" in text, text[-2000:]
        # Bytes done of bytes in all, then the rate ("?" until it has one: a loopback
        # fetch of a small parcel is over in a blink) and the time left.
        assert re.search(r"\d+\.\d/\d+\.\d MB", text) and re.search(r"\d:\d\d:\d\d", text), text[-2000:]
        assert "Traceback" not in text
        assert b.json("suspend", name)["committed"] is True
        p.wait(120)
    finally:
        os.close(master)
