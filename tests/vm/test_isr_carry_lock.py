"""The lock carried on a medium (`suspend --to-usb --full --carry-lock`, `resume --from-usb`)
with a real guest: two sites resume from copies of one key with the server down, and
when it is back the first commit wins and the other is fenced with its changes kept.
Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys


def _sneakernet(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "sneakernet.cli", *args], check=True, capture_output=True)


def test_two_copies_of_a_carrying_key_offline_first_commit_wins(
    sites, parcel, live_server, server_factory, state_of, tmp_path
) -> None:
    a, name = parcel
    pid = a.parcel_id(name)
    key = tmp_path / "key"
    key.mkdir()
    _sneakernet("format", str(key), "--label", "carry")
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    assert con.command("write note before-the-trip") == "GUEST: OK"
    con.close()
    res = a.json("suspend", name, "--to-usb", str(key), "--full", "--carry-lock")
    assert res["committed"] is True and res["version"] == 2, res
    assert res["medium"]["published"] is True and res["medium"]["carries_lock"] is True, res
    a.ended(proc)
    lock = a.lock(name)
    assert lock["holder"]["site"].startswith("medium:") and lock["holder"]["host"] == "carry", lock
    assert state_of(a, pid)["meta"]["status"] == "idle"
    human = a.run("lock", "status", name).stdout
    assert "medium carry" in human and "--from-usb" in human, human
    # A site without the key is refused with one line that says where the lock is.
    r = a.run("resume", name, check=False)
    assert r.returncode != 0 and "medium carry" in r.stderr and "Traceback" not in r.stderr, r.stderr

    copy = tmp_path / "key-copy"
    shutil.copytree(key, copy)
    b, c = sites("b"), sites("c")
    # Site C never logged in: the key carries the server, the user and the sealed bundle.
    c.run("logout")
    (c.dir / "config.json").unlink()

    port = live_server.port
    live_server.stop()  # no network from here on

    proc, ev, con = b.resume(name, "--from-usb", str(key))
    assert ev["cold_boot"] is False and ev["version"] == 2, ev
    assert con.command("read note") == "GUEST: DATA before-the-trip"
    assert con.command("write note written-at-b") == "GUEST: OK"
    con.close()
    assert b.json("suspend", name)["committed"] is False
    b.ended(proc)

    proc, ev, con = c.resume(name, "--from-usb", str(copy))
    assert ev["cold_boot"] is False and ev["version"] == 2, ev
    assert con.command("read note") == "GUEST: DATA before-the-trip"
    assert con.command("write note written-at-c") == "GUEST: OK"
    con.close()
    assert c.json("suspend", name)["committed"] is False
    c.ended(proc)

    # The server is back: B commits first and wins; C is fenced, its changes kept.
    server_factory(data=live_server.data, extra=["--listen", f"127.0.0.1:{port}"])
    assert b.json("sync", name)["version"] == 3
    token = json.loads((b.dir / "config.json").read_text())["token"]
    c.run("login", live_server.url, "--user", "alice", "--token", token, "--kdf-min")
    r = c.run("sync", name, check=False)
    assert r.returncode != 0 and "no longer holds the lock" in r.stderr and "kept" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    st = state_of(c, pid)
    assert st["meta"]["status"] == "fenced" and st["dirty"] > 0, st

    d = sites("d")
    proc, ev, con = d.resume(name)
    assert ev["version"] == 3 and con.command("read note") == "GUEST: DATA written-at-b"
    con.close()
    assert d.json("suspend", name)["committed"] is True
    d.ended(proc)


def test_an_incomplete_key_with_no_network_is_refused_before_anything_runs(
    sites, parcel, live_server, state_of, tmp_path
) -> None:
    a, name = parcel
    pid = a.parcel_id(name)
    key = tmp_path / "key"
    key.mkdir()
    _sneakernet("format", str(key))
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 120)
    con.close()
    res = a.json("suspend", name, "--to-usb", str(key), "--carry-lock")  # not --full
    assert res["medium"]["carries_lock"] is True, res
    a.ended(proc)
    b = sites("b")
    live_server.stop()
    r = b.run("resume", name, "--from-usb", str(key), check=False)
    assert r.returncode != 0 and "neither on the medium nor in this site's cache" in r.stderr, r.stderr
    assert "--full" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert state_of(b, pid)["meta"].get("status", "idle") == "idle"  # nothing taken, nothing to undo
