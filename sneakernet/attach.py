"""A block device with a filesystem becomes a mounted medium, and goes again.

This is the blocking core shared by the watcher (``sneakernet.watch``, run in a
thread there) and by the ``attach``/``detach`` commands that the systemd unit
runs when udev sees a device: find the mount a desktop (udisks2) already made or
mount the filesystem read-only under the site's media directory, look for
``.isrsync/`` at its root, and on the way out unmount only what we mounted.

What happens to a medium once it is mounted (index it, offer it to running
resumes) is not decided here: the integration appends functions to
:data:`HOOKS`, and :func:`attach` and :func:`detach` call them.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyudev

from isrsync.errors import IsrError, NotFound, StateError, UsageError

from .mounts import find_mount, mount_readonly, mounted_at, read_mountinfo, unmount

log = logging.getLogger("sneakernet.attach")

MEDIUM_DIR = ".isrsync"


@dataclass(frozen=True)
class BlockFs:
    """What udev knows of a block device that holds a filesystem."""

    sys_name: str  # the kernel's name (loop0, sdb1): also the name of our mount directory
    devnode: str
    devnum: tuple[int, int]
    fs_type: str
    fs_uuid: str | None = None
    fs_label: str | None = None
    # The kernel numbers every medium a device has held (5.15+): a loop device
    # re-attached to another image, or a card swapped in a reader, differs.
    diskseq: str | None = None

    @property
    def identity(self) -> tuple[object, ...]:
        return (self.devnum, self.fs_type, self.fs_uuid, self.diskseq)


def has_filesystem(props: Mapping[str, str]) -> bool:
    """Whether udev's properties describe a mountable filesystem that is ready."""
    if not props.get("ID_FS_TYPE"):
        return False
    # blkid also types swap, LUKS and RAID members; only "filesystem" mounts.
    if props.get("ID_FS_USAGE", "filesystem") != "filesystem":
        return False
    # 99-systemd.rules marks an unbound loop device (and a detached one) not ready;
    # UDISKS_IGNORE is how a system says "not for the desktop to touch".
    return props.get("SYSTEMD_READY") != "0" and props.get("UDISKS_IGNORE") != "1"


def block_fs(device: pyudev.Device) -> BlockFs | None:
    """The filesystem on a pyudev block device, or None if it holds none."""
    props = dict(device.properties)
    if device.subsystem != "block" or not device.device_node or not has_filesystem(props):
        return None
    num = device.device_number
    return BlockFs(
        sys_name=device.sys_name,
        devnode=device.device_node,
        devnum=(os.major(num), os.minor(num)),
        fs_type=props["ID_FS_TYPE"],
        fs_uuid=props.get("ID_FS_UUID") or None,
        fs_label=props.get("ID_FS_LABEL") or None,
        diskseq=props.get("DISKSEQ") or None,
    )


def probe(devnode: str, context: pyudev.Context | None = None) -> BlockFs:
    """The filesystem on ``devnode`` as udev recorded it; one clear error if none."""
    try:
        device = pyudev.Devices.from_device_file(context or pyudev.Context(), devnode)
    except (pyudev.DeviceNotFoundError, OSError, ValueError) as e:
        raise NotFound(f"{devnode} is not a block device udev knows: {e}") from None
    fs = block_fs(device)
    if fs is None:
        raise UsageError(f"{devnode} holds no filesystem udev has recognised",
                         hint="check `udevadm info` on it; is systemd-udevd running?")
    return fs


@dataclass(frozen=True)
class MediumDevice:
    """A mounted filesystem offered as a medium (or as any filesystem, when asked)."""

    devnode: str
    sys_name: str
    fs_type: str
    fs_uuid: str | None
    fs_label: str | None
    mountpoint: Path
    mounted_by_us: bool  # then it is ours to unmount when the device goes
    read_only: bool  # then an index cannot be written on the medium itself
    has_medium_dir: bool  # `.isrsync/` at its root (False only when any filesystem is offered)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "mountpoint": str(self.mountpoint)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> MediumDevice:
        return cls(**{**d, "mountpoint": Path(d["mountpoint"])})


def prepare(fs: BlockFs, media_dir: Path, *, mount: bool = True, offer_any: bool = False) -> MediumDevice | None:
    """Find or make the mount of ``fs``; the medium it holds, or None if it holds none.

    Raises StateError when there is no mount and none could (or may) be made.
    A filesystem we mounted that holds no medium is unmounted again at once.
    """
    target = media_dir / fs.sys_name
    entries = read_mountinfo()
    stale = mounted_at(entries, target)
    if stale is not None and stale.devnum != fs.devnum and os.path.realpath(stale.source) != os.path.realpath(fs.devnode):
        # Left by an earlier device of the same name that went while nobody watched.
        unmount(target, lazy=True)
        entries = read_mountinfo()
    existing = find_mount(entries, fs.devnum, fs.devnode, prefer_outside=media_dir)
    if existing is not None:
        where, ours, read_only = existing.mountpoint, existing.mountpoint == target, existing.read_only
    elif not mount:
        raise StateError(f"{fs.devnode} is not mounted")
    else:
        media_dir.mkdir(parents=True, exist_ok=True)
        mount_readonly(fs.devnode, target)
        where, ours, read_only = target, True, True
    try:
        has_dir = (where / MEDIUM_DIR).is_dir()
    except OSError:
        has_dir = False  # a device dying under us holds no medium we can use
    if not (has_dir or offer_any):
        if ours:
            unmount(target)
        return None
    return MediumDevice(
        devnode=fs.devnode, sys_name=fs.sys_name, fs_type=fs.fs_type, fs_uuid=fs.fs_uuid,
        fs_label=fs.fs_label, mountpoint=where, mounted_by_us=ours, read_only=read_only,
        has_medium_dir=has_dir,
    )


def release(device: MediumDevice, *, gone: bool = True) -> bool:
    """Unmount ``device`` if we mounted it; True unless our mount is still there.

    A device that went is unmounted lazily: a normal unmount of a filesystem
    whose device is gone can wait on I/O that never completes.
    """
    if not device.mounted_by_us:
        return True
    return unmount(device.mountpoint, lazy=gone)


# --------------------------------------------------------------------------
# attach / detach: what the systemd unit runs, one process per event
# --------------------------------------------------------------------------

Hook = Callable[[MediumDevice], None]


@dataclass
class Hooks:
    """What to do with a medium once it is mounted, and when it goes.

    ``attached`` hooks run in order after the mount, ``detached`` hooks before
    the unmount (so a reader lets go while the files are still there). The
    integration (index the medium, offer it to running resumes) appends here.
    """

    attached: list[Hook] = field(default_factory=list)
    detached: list[Hook] = field(default_factory=list)


HOOKS = Hooks()


def _record_path(media_dir: Path, sys_name: str) -> Path:
    return media_dir / f"{sys_name}.json"


def _sys_name(devnode: str) -> str:
    # A /dev/disk/by-* link dies with its device: resolve it while it is there.
    return Path(os.path.realpath(devnode)).name


def attach(devnode: str, media_dir: Path, *, offer_any: bool = False, hooks: Hooks = HOOKS,
           context: pyudev.Context | None = None) -> MediumDevice | None:
    """Mount (or find the mount of) the filesystem on ``devnode`` and run the attached hooks.

    Returns None, having changed nothing, when it holds no medium. What was
    attached is recorded beside the mount, because ``detach`` runs in another
    process after the device (and what udev knew of it) has gone.
    """
    device = prepare(probe(devnode, context), media_dir, offer_any=offer_any)
    if device is None:
        return None
    record = _record_path(media_dir, device.sys_name)
    record.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=record.parent, prefix=f".{record.name}.", delete=False) as f:
        json.dump(device.to_json(), f)
    os.replace(f.name, record)
    for hook in hooks.attached:
        hook(device)
    return device


def detach(devnode: str, media_dir: Path, *, hooks: Hooks = HOOKS) -> MediumDevice | None:
    """Run the detached hooks for what :func:`attach` made of ``devnode``, then unmount it.

    None when nothing was attached there. The unmount happens even when a hook
    fails (its error is raised afterwards): a gone device must not stay mounted.
    """
    sys_name = _sys_name(devnode)
    record = _record_path(media_dir, sys_name)
    try:
        device = MediumDevice.from_json(json.loads(record.read_text()))
    except FileNotFoundError:
        if mounted_at(read_mountinfo(), media_dir / sys_name) is not None:
            unmount(media_dir / sys_name, lazy=True)  # ours, though its record was lost
        return None
    except (ValueError, TypeError, KeyError) as e:
        record.unlink(missing_ok=True)
        raise StateError(f"{record} is damaged ({e}); removed it") from None
    failure: Exception | None = None
    for hook in hooks.detached:
        try:
            hook(device)
        except Exception as e:  # noqa: BLE001 - the unmount below must still happen
            log.warning("a detach hook failed for %s: %s", device.devnode, e)
            failure = failure or e
    if not release(device, gone=True):
        failure = failure or StateError(f"cannot unmount {device.mountpoint}", hint="is this run as root?")
    record.unlink(missing_ok=True)
    if failure is not None:
        if isinstance(failure, IsrError):
            raise failure
        raise StateError(f"detaching {device.devnode}: {failure}") from failure
    return device


def describe(event: str, device: MediumDevice) -> str:
    """One line for people: what happened to which medium, and where it is mounted."""
    name = " ".join(x for x in (device.fs_type, device.fs_label or device.fs_uuid) if x)
    if device.mounted_by_us:
        how = "mounted read-only by sneakernet"
    else:
        how = "an existing read-only mount" if device.read_only else "an existing mount"
    kind = "" if device.has_medium_dir else " (no .isrsync/)"
    return f"{event}: {device.devnode} ({name}){kind} at {device.mountpoint}, {how}"
