"""`sneakernet attach` / `detach`, what the systemd unit runs, on real loop devices."""

from __future__ import annotations

import json
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from udevkit import LoopKit, loops, udevd, wait_for  # noqa: F401 - fixtures

from isrsync.errors import NotFound, UsageError
from sneakernet.attach import Hooks, MediumDevice, attach, detach
from sneakernet.mounts import mounted_at, read_mountinfo

# systemd-udevd is one per machine, and a loop device one test plugs is an event for
# every watcher: these tests run on their own, after the parallel part (scripts/test).
pytestmark = pytest.mark.serial


def sneakernet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sneakernet.cli", *args], capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL, check=False)


def is_mounted(path: Path) -> bool:
    return mounted_at(read_mountinfo(), path) is not None


def test_attach_mounts_read_only_and_detach_unmounts(loops: LoopKit, tmp_path: Path) -> None:
    loop = loops.plug_and_settle(loops.image("key"))
    media = tmp_path / "media"
    r = sneakernet("attach", loop.devnode, "--media-dir", str(media))
    assert r.returncode == 0, r.stderr
    where = media / loop.sys_name
    assert r.stdout == f"attached: {loop.devnode} (ext4 key) at {where}, mounted read-only by sneakernet\n"
    assert is_mounted(where)

    r = sneakernet("detach", loop.devnode, "--media-dir", str(media), "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["event"], out["medium"]["mountpoint"], out["medium"]["mounted_by_us"]) == ("detached", str(where), True)
    assert not is_mounted(where) and not where.exists()
    # A second detach (systemd may stop a unit twice over) has nothing to do.
    r = sneakernet("detach", loop.devnode, "--media-dir", str(media))
    assert (r.returncode, r.stdout) == (0, f"detached: nothing to do for {loop.devnode}\n")


def test_attach_json_and_an_existing_mount(loops: LoopKit, tmp_path: Path) -> None:
    loop = loops.plug_and_settle(loops.image("desk"))
    desktop = loops.mount(loop)
    r = sneakernet("attach", loop.devnode, "--media-dir", str(tmp_path / "media"), "--json")
    assert r.returncode == 0, r.stderr
    medium = json.loads(r.stdout)["medium"]
    assert (medium["mountpoint"], medium["mounted_by_us"], medium["read_only"]) == (str(desktop), False, False)
    assert medium["fs_label"] == "desk" and medium["has_medium_dir"] is True
    assert sneakernet("detach", loop.devnode, "--media-dir", str(tmp_path / "media")).returncode == 0
    assert is_mounted(desktop), "a desktop's mount is not ours to undo"


def test_attach_of_a_filesystem_without_isrsync_changes_nothing(loops: LoopKit, tmp_path: Path) -> None:
    loop = loops.plug_and_settle(loops.image("plain", medium=False))
    media = tmp_path / "media"
    r = sneakernet("attach", loop.devnode, "--media-dir", str(media), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["medium"] is None
    assert not is_mounted(media / loop.sys_name) and not (media / f"{loop.sys_name}.json").exists()
    r = sneakernet("attach", loop.devnode, "--media-dir", str(media), "--any")
    assert r.returncode == 0 and "(no .isrsync/)" in r.stdout
    assert sneakernet("detach", loop.devnode, "--media-dir", str(media)).returncode == 0


def test_attach_of_what_is_no_filesystem_is_one_line(tmp_path: Path) -> None:
    r = sneakernet("attach", str(tmp_path / "nothing"), "--media-dir", str(tmp_path))
    assert r.returncode == NotFound.exit_code
    assert r.stderr.startswith("sneakernet: ") and len(r.stderr.strip().splitlines()) == 1


def test_hooks_see_the_medium_and_detach_unmounts_even_when_one_fails(loops: LoopKit, tmp_path: Path) -> None:
    loop = loops.plug_and_settle(loops.image("hooked"))
    seen: list[tuple[str, MediumDevice]] = []

    def failing(device: MediumDevice) -> None:
        raise UsageError("the indexer broke")

    hooks = Hooks(attached=[lambda d: seen.append(("attached", d))],
                  detached=[failing, lambda d: seen.append(("detached", d))])
    device = attach(loop.devnode, tmp_path / "media", hooks=hooks)
    assert device is not None and seen == [("attached", device)]
    assert (device.mountpoint / ".isrsync").is_dir(), "hooks run while the medium is mounted"
    with pytest.raises(UsageError, match="the indexer broke"):
        detach(loop.devnode, tmp_path / "media", hooks=hooks)
    assert seen == [("attached", device), ("detached", device)]
    assert not is_mounted(device.mountpoint)


def test_detach_after_the_device_went(loops: LoopKit, tmp_path: Path) -> None:
    """systemd stops the unit after a yank: what udev knew of the device is gone by then."""
    loop = loops.plug_and_settle(loops.image("gone"))
    device = attach(loop.devnode, tmp_path / "media", hooks=Hooks())
    assert device is not None
    loops.yank(loop)
    assert detach(loop.devnode, tmp_path / "media", hooks=Hooks()) == device
    assert not is_mounted(device.mountpoint)


def _read_json_line(proc: subprocess.Popen[str], timeout: float) -> dict:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    if not sel.select(timeout):
        raise AssertionError(f"no line from sneakernet watch within {timeout:g} s")
    line = proc.stdout.readline()
    assert line, f"sneakernet watch exited: {proc.stderr.read() if proc.stderr else ''}"
    return json.loads(line)


def test_watch_command_attaches_and_detaches_until_told_to_stop(loops: LoopKit, tmp_path: Path) -> None:
    loop = loops.plug_and_settle(loops.image("watched"))
    media = tmp_path / "media"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sneakernet.cli", "watch", "--json", "--media-dir", str(media), "--only", loop.devnode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        first = _read_json_line(proc, 30)
        assert (first["event"], first["devnode"], first["medium"]["mountpoint"]) == (
            "medium", loop.devnode, str(media / loop.sys_name))
        loops.yank(loop)
        second = _read_json_line(proc, 5)
        assert (second["event"], second["medium"]) == ("gone", first["medium"])
        wait_for(lambda: not is_mounted(media / loop.sys_name), 5, "the unmount after gone")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_command_unmounts_what_it_mounted_when_stopped(loops: LoopKit, tmp_path: Path) -> None:
    loop = loops.plug_and_settle(loops.image("stopped"))
    media = tmp_path / "media"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sneakernet.cli", "watch", "--media-dir", str(media), "--only", loop.devnode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        assert sel.select(30), "no line from sneakernet watch"
        assert proc.stdout.readline().startswith(f"medium: {loop.devnode} (ext4 stopped) at ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
        assert proc.stdout.read().startswith(f"gone: {loop.devnode}")
        assert not is_mounted(media / loop.sys_name)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
