"""Issue 13, part 4: damaged data in the site cache is reported and healed.

Bytes are flipped in every other chunk a site's cache holds; the parcel is then resumed
there (a cold boot: the boot files and the disk come from the cache). The guest
gets correct data; the resume warns once, in one line; each damaged copy it read is
counted as a bad answer of the cache, dropped and fetched again; the status table
and `--json` agree; and what the run did not read is still found by `cache verify`,
so the two counts add up to every chunk damaged. A real guest and server.

The second test follows the issue's steps with a plain resume (no --json): the guest
writes a file and powers off, the cache is damaged, and the next cold boot reads the
file back whole; the warning is one line of stderr.
"""

from __future__ import annotations

import re
import sqlite3
import sys
import time
from pathlib import Path
from subprocess import DEVNULL, Popen

from isrsync.cli.render import human_bytes


def _damage_every_other_chunk(cache: Path) -> int:
    db = sqlite3.connect(cache / "index.db")
    try:
        rows = db.execute("SELECT f.kind, f.name, c.offset, c.length FROM chunks c JOIN files f ON f.id=c.file").fetchall()
    finally:
        db.close()
    rows = rows[::2]  # the others stay good: the cache must still count its hits
    for kind, name, off, n in rows:
        path = cache / ("segments" if kind == "segment" else "packs") / name
        with open(path, "r+b") as f:
            f.seek(off + n // 2)
            b = f.read(1)
            f.seek(off + n // 2)
            f.write(bytes([b[0] ^ 0x5A]))
    return len(rows)


def _cache_row(run: dict) -> dict:
    (row,) = [s for s in run["sources"] if s["kind"] == "cache"]
    return row


def test_damaged_cache_reads_are_counted_warned_once_dropped_and_fetched_again(sites, parcel, live_server) -> None:
    a, name = parcel
    damaged = _damage_every_other_chunk(a.cache)
    assert damaged > 25

    served_before = live_server.pack_bytes_sent()
    proc, ev, con = a.resume(name)
    assert ev["cold_boot"] is True
    con.wait_for("GUEST: READY", 180)
    assert con.command("read hello.txt") == "GUEST: DATA made at init"  # never a wrong byte
    time.sleep(1.0)

    # The table and --json are one value: the cache row agrees (hits, bytes, bad).
    (run,) = a.json("status")["running"]
    table = a.run("status").stdout
    (again,) = a.json("status")["running"]
    row, row2 = _cache_row(run), _cache_row(again)
    assert row == row2, (row, row2)  # nothing moved between the two looks
    assert row["bad"] > 0 and row["hits"] > 0, row
    line = next(ln for ln in table.splitlines() if re.match(r"^[│|]\s*cache\s*[│|]", ln))
    cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
    assert cells[:5] == ["cache", "cache", str(row["hits"]), cells[3], str(row["bad"])], (cells, row)
    assert cells[3] != "0 B", cells
    # What was dropped came again from the server.
    assert live_server.pack_bytes_sent() > served_before

    con.close()
    assert a.json("suspend", name)["committed"] is True
    rc, events, err = proc.finish(120)
    assert rc == 0, err[-2000:]
    warnings = [e["message"] for e in events if e["event"] == "warning" and "damaged" in e.get("message", "")]
    assert len(warnings) == 1, warnings
    assert "\n" not in warnings[0] and "cache verify" in warnings[0], warnings
    healed = row["bad"]

    # The damaged copies the run read are gone (dropped, then stored again good);
    # the ones it never read are what `cache verify` still finds.
    verify = a.json("cache", "verify")
    assert len(verify["dropped"]) + healed == damaged, (len(verify["dropped"]), healed, damaged)
    assert a.json("cache", "verify")["dropped"] == []


def _cached_tags(cache: Path) -> set[str]:
    db = sqlite3.connect(cache / "index.db")
    try:
        return {bytes(t).hex() for (t,) in db.execute("SELECT tag FROM chunks")}
    finally:
        db.close()


def test_damage_under_a_file_the_guest_reads_is_one_line_on_stderr_and_healed(sites, parcel, live_server) -> None:
    """The issue's own steps: a run writes a file and ends, every chunk the site's cache
    holds is then damaged, and a plain (not --json) resume has the guest read the file
    back whole. Its bytes are right; stderr says it once, on one line; the cache row
    counts each damaged copy read, table and --json alike; and each is stored again good."""
    a, name = parcel
    proc, _, con = a.resume(name)
    con.wait_for("GUEST: READY", 180)
    assert con.command("fill big 4", 120) == "GUEST: OK"
    sha = con.command("sha big", 120)
    assert sha.startswith("GUEST: SHA "), sha
    assert con.command("poweroff") == "GUEST: BYE"  # the next resume cold-boots: every byte from the disk
    con.close()
    assert a.ended(proc)["committed"] is True

    damaged = _damage_every_other_chunk(a.cache)
    assert damaged > 20  # every other of the 4 MiB file's 32 chunks, and of the rest
    before = _cached_tags(a.cache)

    serial = a.runtime / "ser.sock"
    serial.unlink(missing_ok=True)
    exe = Path(sys.executable).parent / "isrsync"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "isrsync.cli.main"]
    with open(a.dir / "resume.err", "w+") as errf:
        p = Popen([*cmd, "resume", name, "--serial", str(serial)], env=a.env, stdout=DEVNULL, stderr=errf)
        try:
            con = type(con)(serial, connect_timeout=180)
            con.wait_for("GUEST: READY", 180)
            assert con.command("sha big", 180) == sha  # never a wrong byte
            assert con.command("read hello.txt") == "GUEST: DATA made at init"
            time.sleep(1.0)

            (run,) = a.json("status")["running"]
            table = a.run("status").stdout
            row = _cache_row(run)
            assert row["bad"] >= 16 and row["hits"] > 0, row  # every other chunk of the file, at least
            line = next(ln for ln in table.splitlines() if re.match(r"^[│|]\s*cache\s*[│|]", ln))
            cells = [c.strip() for c in re.split(r"[│|]", line) if c.strip()]
            assert cells[2:5] == [str(row["hits"]), human_bytes(row["bytes"]), str(row["bad"])], (cells, row)
            con.close()
            assert a.json("suspend", name)["committed"] is True
            assert p.wait(120) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        errf.seek(0)
        err = errf.read()
    said = [ln for ln in err.splitlines() if "damaged" in ln]
    assert len(said) == 1, err[-3000:]
    assert said[0].startswith("warning: this site's cache held damaged copies"), said
    assert said[0].rstrip().endswith("`isrsync cache verify` checks the rest of the cache"), said  # not wrapped

    # Each damaged copy the run read is in the cache again, good; the rest, never
    # read, is what `cache verify` drops now.
    dropped = set(a.json("cache", "verify")["dropped"])
    assert len(dropped) + row["bad"] == damaged, (len(dropped), row["bad"], damaged)
    assert before - dropped <= _cached_tags(a.cache)
