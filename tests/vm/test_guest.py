"""The test guest: building and caching it, and its /init contract under real QEMU."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from isrsync.demo import guest as guestmod
from isrsync.demo.guest import (
    Guest,
    build_guest,
    make_disk_image,
    qemu_accel,
    qemu_base_args,
)

pytestmark = pytest.mark.slow


def debugfs_cat(image: Path, name: str) -> bytes:
    p = subprocess.run(["debugfs", "-R", f"cat /{name}", str(image)], capture_output=True, check=True)
    return p.stdout


def timing(record_property, name: str, value: float) -> None:
    record_property(name, round(value, 3))
    print(f"\n[timing] {name}: {value:.3f}", file=sys.stderr)


# ----------------------------------------------------------------------------- build


def test_build_is_cached_and_complete(guest: Guest) -> None:
    cache = guest.kernel.parent
    t0 = time.monotonic()
    again = build_guest(cache)
    assert time.monotonic() - t0 < 1.0
    assert again == guest
    manifest = json.loads((cache / guestmod.MANIFEST).read_text())
    assert manifest["kernel_version"] == guest.kernel_version
    assert guest.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", guest.kernel_version)
    assert "console=ttyS0" in guest.cmdline and "rdinit=/init" in guest.cmdline
    # The initramfs is a newc archive that busybox can list; modules load in dependency order.
    listing = subprocess.run(
        ["busybox", "cpio", "-t"], input=guest.initrd.read_bytes(), capture_output=True, check=True
    ).stdout.decode().split()
    assert {"init", "bin/busybox", "dev/console"} <= set(listing)
    mods = [Path(m).name.split("-", 1)[1][:-3] for m in listing if m.startswith("lib/modules/") and m.endswith(".ko")]
    assert mods == manifest["modules"]
    if "virtio_pci" in mods and "virtio" in mods:
        assert mods.index("virtio") < mods.index("virtio_pci")
    if "virtio_blk" in mods and "virtio_ring" in mods:
        assert mods.index("virtio_ring") < mods.index("virtio_blk")


def test_damaged_cache_is_rebuilt_and_concurrent_builds_agree(guest: Guest, tmp_path: Path) -> None:
    """Two processes building into one fresh cache dir both get the same, complete guest."""
    cache = tmp_path / "cache"
    (cache / "debs").mkdir(parents=True)
    for deb in (guest.kernel.parent / "debs").glob("*.deb"):  # spare the 27 MB download
        try:
            os.link(deb, cache / "debs" / deb.name)
        except OSError:  # another filesystem
            shutil.copyfile(deb, cache / "debs" / deb.name)
    code = (
        "import json,sys; from pathlib import Path; from isrsync.demo.guest import build_guest;"
        "g=build_guest(Path(sys.argv[1])); print(json.dumps([str(g.kernel),str(g.initrd),g.cmdline,g.kernel_version]))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()
        outs.append(json.loads(out))
    assert outs[0] == outs[1]
    built = Guest(Path(outs[0][0]), Path(outs[0][1]), outs[0][2], outs[0][3])
    assert built.initrd.read_bytes() == guest.initrd.read_bytes()  # reproducible
    assert built.kernel.read_bytes() == guest.kernel.read_bytes()
    assert not list(cache.glob(".build-*"))
    # A truncated initrd no longer matches the manifest: the next call rebuilds it.
    with open(built.initrd, "r+b") as f:
        f.truncate(100)
    again = build_guest(cache)
    assert again.initrd.stat().st_size == guest.initrd.stat().st_size


def test_make_disk_image_holds_files(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    make_disk_image(img, 16, {"a": b"alpha", "sub/b": b"\x00\x01" * 5000})
    assert img.stat().st_size == 16 * 1024 * 1024
    assert debugfs_cat(img, "a") == b"alpha"
    assert debugfs_cat(img, "sub/b") == b"\x00\x01" * 5000
    assert img.read_bytes()[1024 + 0x38 : 1024 + 0x3A] == b"\x53\xef"  # ext4 magic, no partition table
    with pytest.raises(ValueError):
        make_disk_image(tmp_path / "e.img", 16, {"../escape": b"x"})


def test_accel_and_base_args(guest: Guest) -> None:
    flags = Path("/proc/cpuinfo").read_text()
    acc = qemu_accel()
    if not re.search(r"\b(vmx|svm)\b", flags):
        assert acc == "tcg"
    assert acc in ("kvm", "tcg")
    args = qemu_base_args(guest, 256, "tcg")
    assert args[args.index("-machine") + 1] == f"{guestmod.MACHINE},accel=tcg"
    assert args[args.index("-m") + 1] == "256"
    assert args[args.index("-kernel") + 1] == str(guest.kernel)
    assert args[args.index("-append") + 1] == guest.cmdline
    assert "-nodefaults" in args
    assert not any(a in args for a in ("-drive", "-serial", "-blockdev", "-device"))


# ----------------------------------------------------------------------------- boot


def test_boot_commands_and_disk(vm_factory, tmp_path: Path, record_property) -> None:
    img = tmp_path / "disk.img"
    make_disk_image(img, 64, {"pre": b"from the host"})
    vm = vm_factory(disk=img)
    vm.serial.wait_for("GUEST: READY", timeout=120)
    timing(record_property, "boot_to_ready_s", time.monotonic() - vm.started)
    assert "GUEST: NODISK" not in vm.serial.transcript
    s = vm.serial
    assert s.command("echo hi") == "GUEST: ECHO hi"
    assert s.command("echo two  spaces") == "GUEST: ECHO two  spaces"
    assert s.command("read pre") == "GUEST: DATA from the host"
    assert s.command("write a hello") == "GUEST: OK"
    assert s.command("read a") == "GUEST: DATA hello"
    assert s.command("write msg hello big world") == "GUEST: OK"
    assert s.command("read msg") == "GUEST: DATA hello big world"
    assert s.command("read nope") == "GUEST: MISSING"
    assert s.command("sha nope") == "GUEST: MISSING"
    assert s.command("sha a") == f"GUEST: SHA {hashlib.sha256(b'hello').hexdigest()}"
    assert s.command("fill blob 2") == "GUEST: OK"
    blob_sha = s.command("sha blob")
    assert re.fullmatch(r"GUEST: SHA [0-9a-f]{64}", blob_sha)
    assert s.command("sync") == "GUEST: OK"
    assert s.command("read ../etc") == "GUEST: ERR bad name"
    assert s.command("frobnicate") == "GUEST: ERR unknown frobnicate"
    c1 = int(s.command("counter").split()[2])
    time.sleep(1.5)
    c2 = int(s.command("counter").split()[2])
    assert c2 > c1, (c1, c2)
    assert s.command("poweroff") == "GUEST: BYE"
    assert vm.wait(60) == 0
    assert debugfs_cat(img, "a") == b"hello"
    assert debugfs_cat(img, "pre") == b"from the host"
    blob = debugfs_cat(img, "blob")
    assert len(blob) == 2 * 1024 * 1024
    assert blob_sha == f"GUEST: SHA {hashlib.sha256(blob).hexdigest()}"
    fsck = subprocess.run(["e2fsck", "-fn", str(img)], check=False, capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr  # unmounted cleanly


def test_unmountable_disk_says_nodisk(vm_factory, tmp_path: Path) -> None:
    img = tmp_path / "zeros.img"
    with open(img, "wb") as f:
        f.truncate(8 * 1024 * 1024)
    vm = vm_factory(disk=img, qmp=False)
    vm.serial.wait_for("GUEST: READY", timeout=120)
    assert "GUEST: NODISK" in vm.serial.transcript
    assert vm.serial.command("write a b") == "GUEST: ERR nodisk"
    assert vm.serial.command("echo still here") == "GUEST: ECHO still here"
    assert vm.serial.command("poweroff") == "GUEST: BYE"
    assert vm.wait(60) == 0
    assert img.read_bytes() == bytes(8 * 1024 * 1024)


# ----------------------------------------------------------------------------- migration


def _wait_migration(qmp, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = qmp.execute("query-migrate")
        if info.get("status") == "completed":
            return info
        assert info.get("status") not in ("failed", "cancelled"), info
        time.sleep(0.05)
    raise TimeoutError("migration did not complete")


def test_memory_survives_migration_through_a_file(vm_factory, tmp_path: Path, record_property) -> None:
    img = tmp_path / "disk.img"
    mem = tmp_path / "memory.img"
    make_disk_image(img, 64)
    src = vm_factory(disk=img, memory_mib=256)
    src.serial.wait_for("GUEST: READY", timeout=120)
    assert src.serial.command("write before one") == "GUEST: OK"
    # Let the counter get well away from 0, so a restarted counter cannot pass.
    deadline = time.monotonic() + 60
    while (c1 := int(src.serial.command("counter").split()[2])) < 20:
        assert time.monotonic() < deadline
        time.sleep(0.5)

    t0 = time.monotonic()
    src.qmp.execute("stop")
    src.qmp.execute("migrate-set-parameters", **{"max-bandwidth": 8 << 30})
    src.qmp.execute("migrate", uri=f"exec:cat > {mem}")
    info = _wait_migration(src.qmp)
    save_s = time.monotonic() - t0
    try:
        src.qmp.execute("quit")
    except EOFError:  # QEMU 7.2 may drop the connection before replying
        pass
    assert src.wait(30) == 0
    size = mem.stat().st_size
    timing(record_property, "migrate_save_s", save_s)
    timing(record_property, "memory_image_mib", size / 2**20)
    assert 1 << 20 < size < 256 << 20, info  # zero pages are not sent in full

    t1 = time.monotonic()
    dst = vm_factory(disk=img, memory_mib=256, extra=["-incoming", f"exec:cat {mem}"])
    deadline = time.monotonic() + 300
    while (status := dst.qmp.status()) not in ("paused", "running"):
        assert status in ("inmigrate", "prelaunch"), status
        assert time.monotonic() < deadline, "incoming migration did not finish"
        time.sleep(0.05)
    timing(record_property, "migrate_restore_s", time.monotonic() - t1)
    assert status == "paused"  # the source was stopped before it was saved
    dst.qmp.execute("cont")
    assert dst.qmp.status() == "running"

    c2 = int(dst.serial.command("counter").split()[2])
    assert c1 <= c2 < c1 + 100, (c1, c2)  # memory came along: it did not restart from 0
    assert "GUEST: READY" not in dst.serial.transcript  # no second boot
    assert dst.serial.command("read before") == "GUEST: DATA one"
    assert dst.serial.command("write after two") == "GUEST: OK"
    assert dst.serial.command("read after") == "GUEST: DATA two"
    time.sleep(0.5)
    assert int(dst.serial.command("counter").split()[2]) > c2
    assert dst.serial.command("poweroff") == "GUEST: BYE"
    assert dst.wait(60) == 0
    assert debugfs_cat(img, "before") == b"one"
    assert debugfs_cat(img, "after") == b"two"
