"""A site that cannot run a parcel's machine says so before it takes the lock
(paper section 8.3, the hardware requirements tag). Fixtures: tests/vm/conftest.py."""

from __future__ import annotations

from pathlib import Path

from isrsync.demo.guest import make_disk_image

from sitekit import message_lines


def _total_ram_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_resume_refuses_a_machine_larger_than_this_site_before_locking(sites, guest, tmp_path: Path) -> None:
    a = sites("a")
    img = tmp_path / "disk.img"
    make_disk_image(img, 16, {"hello.txt": b"big machine"})
    memory = _total_ram_mib() * 10
    a.run("init", "big", "--image", str(img), "--memory", str(memory), "--kernel", str(guest.kernel),
          "--initrd", str(guest.initrd), "--append", guest.cmdline)
    before = a.lock("big")
    assert before["holder"] is None and before["version"] == 1

    for site in (a, sites("b")):  # the creating site (all cached) and an empty one
        r = site.run("resume", "big", "--json", check=False, timeout=120)
        assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
        msg = r.stderr.strip()
        assert len(message_lines(msg)) == 1 and "Traceback" not in msg, msg
        assert "cannot run" in msg and f"{memory} MiB" in msg, msg
        assert "resumed" not in r.stdout
        assert site.qemu_pids() == []
        # Refused before the lock: nobody holds it and the epoch did not move.
        after = site.lock("big")
        assert after == before, (before, after)
        assert site.json("status")["running"] == []
