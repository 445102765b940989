"""A key bundle that follows the user, through the CLI with a real guest: a parcel made at
another site after this site logged in resumes here with no new login. Fixtures are in
tests/vm/conftest.py."""

from __future__ import annotations

from pathlib import Path

from isrsync.demo.guest import make_disk_image


def test_a_parcel_made_after_this_sites_login_resumes_without_logging_in_again(sites, guest, tmp_path: Path) -> None:
    a = sites("a")  # logs in first: its unlocked bundle has no parcel yet
    b = sites("b")
    img = tmp_path / "disk.img"
    make_disk_image(img, 32, {"hello.txt": b"made at b"})
    b.run("init", "vm", "--image", str(img), "--memory", "256", "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline)

    proc, ev, con = a.resume("vm")
    con.wait_for("GUEST: READY", 120)
    assert con.command("read hello.txt") == "GUEST: DATA made at b"
    con.close()
    assert a.json("suspend", "vm")["committed"] is True
    a.ended(proc)
