"""`isrsync hoard --follow` keeps a site's cache full as versions are committed
elsewhere, so a proactive resume there fetches nothing."""

from __future__ import annotations

import json
import queue
import subprocess
import threading


from sitekit import isrsync_argv


def test_hoard_follow_fetches_each_new_version(sites, parcel) -> None:
    a, name = parcel
    b = sites("b")
    p = subprocess.Popen([*isrsync_argv(), "hoard", name, "--follow", "--interval", "1", "--json"],
                         env=b.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in p.stdout], daemon=True).start()  # type: ignore[union-attr]
    try:
        first = json.loads(lines.get(timeout=120))
        assert first["version"] == 1 and first["fetched"] > 0

        assert a.boot_and_suspend(name, "write note hoarded") == 2

        second = json.loads(lines.get(timeout=120))
        assert second["version"] == 2 and second["fetched"] > 0  # the memory image and the new chunks
        assert p.poll() is None  # --follow keeps going
    finally:
        p.terminate()
        p.wait(30)

    proc, ev, con = b.resume(name, "--policy", "proactive")
    assert ev["version"] == 2 and ev["fetched_before_start"] == 0, ev
    assert con.command("read note") == "GUEST: DATA hoarded"
    con.close()
    status = b.json("status")
    assert {s["name"]: s for s in status["running"][0]["sources"]}["server"]["hits"] == 0
    b.json("suspend", name)
    b.ended(proc)
