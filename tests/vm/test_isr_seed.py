"""A plaintext seed (`sneakernet seed IMAGE`) as a lookaside source, end to end with a real
guest: the base image a parcel was made from serves the chunks that are still the same,
a stale seed never harms, and the home server sends correspondingly less. Fixtures are
in tests/vm/conftest.py."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from isrsync.demo.guest import make_disk_image

BIG = 8 << 20  # a file of the base image: chunks a seed can serve


def _sneakernet(site, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sneakernet.cli", *args], env=site.env, capture_output=True,
                          text=True, timeout=300, check=False)


def test_a_seed_serves_the_unchanged_chunks_of_a_real_parcel(sites, guest, live_server, tmp_path: Path) -> None:
    a = sites("a")
    base = tmp_path / "base.img"
    payload = os.urandom(BIG)
    make_disk_image(base, 64, {"hello.txt": b"made at init", "big.bin": payload})
    os.utime(base, ns=(1_600_000_000 * 10**9,) * 2)  # outside the racy window
    a.run("init", "vm", "--image", str(base), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline)
    # The user works: the parcel moves away from the image (a new file, the journal).
    assert a.boot_and_suspend("vm", "write note after-init", "fill more 2") == 2

    # Site B has the base image (a DVD, an old copy) and seeds it; site C has nothing.
    b, c = sites("b"), sites("c")
    r = _sneakernet(b, "seed", str(base), "--json")
    assert r.returncode == 0, r.stderr
    seeded = json.loads(r.stdout)["seed"]
    assert seeded["kind"] == "raw" and seeded["chunks"] * (128 << 10) >= BIG, seeded

    before = live_server.pack_bytes_sent()
    plain = json.loads(c.run("hoard", "vm", "--json").stdout.splitlines()[-1])
    without = live_server.pack_bytes_sent() - before

    before = live_server.pack_bytes_sent()
    helped = json.loads(b.run("hoard", "vm", "--json").stdout.splitlines()[-1])
    with_seed = live_server.pack_bytes_sent() - before

    assert helped["chunks"] == plain["chunks"] and helped["fetched"] == plain["fetched"]
    src = {s["kind"]: s for s in helped["sources"]}
    assert src["seed"]["bad"] == 0 and src["seed"]["errors"] == 0, src
    # Every chunk of big.bin is unchanged and the seed has it; the server sent that much less.
    assert src["seed"]["hits"] >= BIG // (128 << 10), src
    assert without - with_seed >= BIG * 0.9, (without, with_seed)
    assert "seed" not in {s["kind"] for s in plain["sources"]}

    # A resume at B reads the right bytes: unchanged files (from the seed or the
    # cache) and the user's changes (which the stale seed cannot have).
    proc, ev, con = b.resume("vm", "--policy", "lookaside")
    assert ev["cold_boot"] is False, ev  # version 2 was suspended with its memory image
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    assert con.command("read note") == "GUEST: DATA after-init"
    assert con.command("sha big.bin") == f"GUEST: SHA {hashlib.sha256(payload).hexdigest()}"
    con.close()
    b.json("suspend", "vm")
    b.ended(proc)


def test_a_seed_of_a_changed_image_is_left_out_and_the_resume_still_works(sites, guest, tmp_path: Path) -> None:
    a = sites("a")
    base = tmp_path / "base.img"
    make_disk_image(base, 32, {"hello.txt": b"made at init", "big.bin": os.urandom(2 << 20)})
    os.utime(base, ns=(1_600_000_000 * 10**9,) * 2)
    a.run("init", "vm", "--image", str(base), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline)
    b = sites("b")
    assert _sneakernet(b, "seed", str(base)).returncode == 0
    with open(base, "r+b") as f:  # somebody mounts and changes the image after it was seeded
        f.seek(1 << 20)
        f.write(os.urandom(4096))
    (s,) = json.loads(_sneakernet(b, "seeds", "--json").stdout)
    assert s["status"] == "changed"
    proc, ev, con = b.resume("vm", "--policy", "lookaside")
    con.wait_for("GUEST: READY", 120)
    assert con.command("read hello.txt") == "GUEST: DATA made at init"
    (run,) = b.json("status")["running"]
    assert "seed" not in {x["kind"] for x in run["sources"]}
    con.close()
    b.json("suspend", "vm")
    b.ended(proc)
