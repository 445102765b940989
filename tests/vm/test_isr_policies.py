"""The transfer policies (paper section 6) through the real CLI, each at a fresh site
resuming a version with a memory image. Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import json
import time

from isrsync.site.policy import Policy


def _counter(con) -> int:
    reply = con.command("counter")
    assert reply.startswith("GUEST: COUNTER "), reply
    return int(reply.split()[-1])


def _source(run: dict, name: str) -> dict:
    return {s["name"]: s for s in run["sources"]}[name]


def _server_hits(site) -> int:
    (run,) = site.json("status")["running"]
    return _source(run, "server")["hits"]


def test_every_policy_resumes_memory_and_hoarded_proactive_fetches_nothing(sites, parcel) -> None:
    assert {p.value for p in Policy} == {"baseline", "proactive", "demand", "lookaside", "auto"}
    a, name = parcel
    proc, ev, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note policy-note") == "GUEST: OK"
    time.sleep(1.0)
    c1 = _counter(con)
    con.close()
    assert a.json("suspend", name)["version"] == 2
    a.ended(proc)

    version = 2
    for policy in ("baseline", "proactive", "demand", "lookaside", "auto"):
        s = sites(f"p-{policy}")
        proc, ev, con = s.resume(name, "--policy", policy, "--version", "2")
        assert ev["policy"] == policy and ev["version"] == 2 and ev["cold_boot"] is False, ev
        fetched = ev["fetched_before_start"]
        hits0 = _server_hits(s)
        c = _counter(con)
        assert c1 <= c < c1 + 200, (policy, c1, c, proc.events, proc.stderr[-3000:])
        assert con.command("read note") == "GUEST: DATA policy-note", policy
        assert con.command("read hello.txt") == "GUEST: DATA made at init", policy
        assert con.command("sha note").startswith("GUEST: SHA "), policy
        hits1 = _server_hits(s)
        if policy in ("baseline", "proactive"):
            # Everything (disk, memory image, boot files) came before the guest started ...
            assert fetched > 0, (policy, ev)
            assert hits0 >= fetched, (policy, hits0, fetched)
            # ... so running it asks the server for nothing more.
            assert hits1 == hits0, (policy, hits0, hits1)
        else:
            # Nothing before the start: the memory image and the disk come on demand.
            assert fetched == 0, (policy, ev)
            assert hits0 > 0, (policy, hits0)
        if policy == "proactive":
            # Resuming proactively from a cold cache works, but says the cache was not hoarded.
            assert any(e["event"] == "warning" and "hoarded" in e["message"] for e in proc.events), proc.events
        con.close()
        version += 1
        res = s.json("suspend", name)
        assert res["committed"] is True and res["version"] == version, (policy, res)
        s.ended(proc)

    # Fully proactive: hoard first, then the resume needs nothing from the server at all.
    h = sites("hoarder")
    r = h.run("hoard", name, "--json")
    (line,) = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    assert line["version"] == version and line["fetched"] > 0 and line["fetched"] <= line["chunks"], line
    again = json.loads(h.run("hoard", name, "--json").stdout)
    assert again["fetched"] == 0, again  # restartable: what is cached is skipped
    proc, ev, con = h.resume(name, "--policy", "proactive")
    assert ev["version"] == version and ev["cold_boot"] is False and ev["fetched_before_start"] == 0, ev
    assert not any(e["event"] == "warning" for e in proc.events), proc.events
    assert _server_hits(h) == 0
    assert con.command("read note") == "GUEST: DATA policy-note"
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    assert con.command("write hoarded-write local") == "GUEST: OK"
    assert _server_hits(h) == 0
    con.close()
    assert h.json("suspend", name)["version"] == version + 1
    h.ended(proc)
