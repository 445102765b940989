"""Reading /proc/self/mountinfo and the default media directory (no devices needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sneakernet.mounts import default_media_dir, find_mount, parse_mountinfo

# systemd-udevd is one per machine, and a loop device one test plugs is an event for
# every watcher: these tests run on their own, after the parallel part (scripts/test).
pytestmark = pytest.mark.serial

MOUNTINFO = """\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
45 22 7:0 / /run/media/u/My\\040Key rw,nosuid,nodev shared:7 master:1 - vfat /dev/loop0 rw,fmask=0022
46 22 7:0 /sub /srv/bind rw - vfat /dev/loop0 rw
47 22 0:55 / /tmp/ours/loop1 ro,nosuid,nodev,noexec - btrfs /dev/loop1 ro,space_cache
48 22 7:0 / /tmp/ours/loop0 ro - vfat /dev/loop0 ro
this line is not mountinfo
"""


def test_fields_escapes_and_optional_fields() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    assert len(entries) == 5
    key = entries[1]
    assert key.mountpoint == Path("/run/media/u/My Key") and key.fs_type == "vfat"
    assert key.devnum == (7, 0) and key.source == "/dev/loop0" and not key.read_only
    assert entries[3].read_only and entries[3].fs_type == "btrfs"


def test_find_mount_wants_the_whole_filesystem_and_prefers_a_desktops() -> None:
    entries = parse_mountinfo(MOUNTINFO)
    found = find_mount(entries, (7, 0), "/dev/loop0", prefer_outside=Path("/tmp/ours"))
    assert found is not None and found.mountpoint == Path("/run/media/u/My Key")  # not the bind of /sub
    # btrfs shows an anonymous device number: the source names it.
    btrfs = find_mount(entries, (7, 1), "/dev/loop1")
    assert btrfs is not None and btrfs.mountpoint == Path("/tmp/ours/loop1")
    assert find_mount(entries, (8, 1), "/dev/sdb1") is None


def test_default_media_dir_follows_the_sites_runtime_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ISRSYNC_RUNTIME", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert default_media_dir() == Path("/run/user/1000/isrsync/media")
    monkeypatch.setenv("ISRSYNC_RUNTIME", "/srv/rt")
    assert default_media_dir() == Path("/srv/rt/media")


@pytest.mark.parametrize("env", [{"ISRSYNC_RUNTIME": "rt"}, {"XDG_RUNTIME_DIR": "xdg"}, {}])
def test_the_media_dir_is_in_the_same_runtime_dir_as_the_sites(
    env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sneakernet may not import the site's runtime_dir, so it keeps a copy: this keeps them in step."""
    from isrsync.site.account import runtime_dir

    for name in ("ISRSYNC_RUNTIME", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    assert default_media_dir().parent == runtime_dir()
