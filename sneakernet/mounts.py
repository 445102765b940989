"""The mount table, and mounting a medium read-only where the site keeps its media.

Every function here blocks (it reads /proc or runs mount(8)): callers on an event
loop run them in a thread. mount(8) is used rather than mount(2) so that the
filesystem type is probed by libmount exactly as a desktop would, and so the
kernel's one-line complaint reaches the user.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from isrsync.errors import StateError

MOUNTINFO = Path("/proc/self/mountinfo")
# A medium is data, never programs: nothing on it runs or names a device.
MOUNT_OPTIONS = "ro,nosuid,nodev,noexec"
MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 10.0


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo (proc(5))."""

    mount_id: int
    devnum: tuple[int, int]  # st_dev of the mounted filesystem
    root: str  # the directory of the filesystem mounted there ("/" unless a bind mount)
    mountpoint: Path
    options: frozenset[str]  # per-mount options: ro or rw, nosuid, ...
    fs_type: str
    source: str
    super_options: frozenset[str]

    @property
    def read_only(self) -> bool:
        return "ro" in self.options or "ro" in self.super_options


_OCTAL = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \ooo.
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[MountEntry]:
    entries: list[MountEntry] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)  # optional fields (shared:N ...) end at "-"
            major, minor = fields[2].split(":")
            entries.append(MountEntry(
                mount_id=int(fields[0]),
                devnum=(int(major), int(minor)),
                root=_unescape(fields[3]),
                mountpoint=Path(_unescape(fields[4])),
                options=frozenset(fields[5].split(",")),
                fs_type=fields[sep + 1],
                source=_unescape(fields[sep + 2]),
                super_options=frozenset(fields[sep + 3].split(",")) if len(fields) > sep + 3 else frozenset(),
            ))
        except (ValueError, IndexError):
            continue  # a line this parser does not understand names no medium
    return entries


def read_mountinfo(path: Path = MOUNTINFO) -> list[MountEntry]:
    return parse_mountinfo(path.read_text(errors="surrogateescape"))


def find_mount(entries: list[MountEntry], devnum: tuple[int, int], devnode: str,
               *, prefer_outside: Path | None = None) -> MountEntry | None:
    """The mount showing the whole filesystem on ``devnode``, or None.

    A bind mount of a subdirectory does not show the medium's root, so only a
    mount of "/" counts. btrfs reports an anonymous st_dev, hence the match on
    the source too. A mount outside ``prefer_outside`` (a desktop's) wins over
    one of ours, so that the one a user sees is the one offered.
    """
    real = os.path.realpath(devnode)
    found = [e for e in entries
             if e.root == "/" and (e.devnum == devnum or os.path.realpath(e.source) == real)]
    if prefer_outside is not None:
        found.sort(key=lambda e: e.mountpoint.is_relative_to(prefer_outside))
    return found[0] if found else None


def mounted_at(entries: list[MountEntry], path: Path) -> MountEntry | None:
    """The topmost mount at ``path``, or None."""
    at = [e for e in entries if e.mountpoint == path]
    return at[-1] if at else None


def _run(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no message"


def mount_readonly(devnode: str, target: Path, *, timeout: float = MOUNT_TIMEOUT) -> None:
    """Mount the filesystem on ``devnode`` read-only at ``target`` (created if missing)."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        r = _run(["mount", "-o", MOUNT_OPTIONS, devnode, str(target)], timeout)
    except subprocess.TimeoutExpired:
        raise StateError(f"mounting {devnode} at {target} took longer than {timeout:.0f} s",
                         hint="the device may be failing; unplug it") from None
    except FileNotFoundError:
        raise StateError("mount(8) is not installed", hint="install util-linux's mount") from None
    if r.returncode != 0:
        _rmdir_quietly(target)
        raise StateError(f"cannot mount {devnode} read-only at {target}: {_last_line(r.stderr)}")


def unmount(target: Path, *, lazy: bool = False, timeout: float = UMOUNT_TIMEOUT) -> bool:
    """Unmount ``target`` and remove its directory; True when it is no longer mounted.

    A busy mount (a reader still has a file open) or one that hangs on a dead
    device is detached lazily: it leaves the namespace at once and the kernel
    lets go of it when the last reader does, so a yanked medium never stalls us.
    """
    if not lazy:
        try:
            r = _run(["umount", str(target)], timeout)
            if r.returncode == 0:
                _rmdir_quietly(target)
                return True
        except subprocess.TimeoutExpired:
            pass
    try:
        r = _run(["umount", "--lazy", str(target)], timeout)
    except subprocess.TimeoutExpired:
        return False
    if r.returncode != 0 and mounted_at(read_mountinfo(), target) is not None:
        return False
    _rmdir_quietly(target)
    return True


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty or already gone: it is not ours to clear


def default_media_dir() -> Path:
    """Where this site mounts media: ``media/`` in the site's runtime directory.

    Kept in step with isrsync.site.account.runtime_dir, which sneakernet may not
    import (it reaches isrsync only through the Source protocol).
    """
    if os.environ.get("ISRSYNC_RUNTIME"):
        base = Path(os.environ["ISRSYNC_RUNTIME"])
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "isrsync"
    else:
        base = Path("/dev/shm") / f"isrsync-{os.getuid()}"
    return base / "media"
