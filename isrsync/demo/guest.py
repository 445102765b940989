"""A tiny Linux guest, built on the spot, for isrsync's demo and tests.

:func:`build_guest` assembles a bootable guest from Debian packages: the cloud
kernel (``linux-image-cloud-amd64``, resolved to the real versioned package and
fetched with ``apt-get download``) and a newc initramfs holding busybox-static,
the few kernel modules the guest needs (virtio PCI and block; ext4 and friends
only when they are not built in) and an ``/init`` shell script. The result is
cached in a directory: a complete build is marked by a manifest written last,
atomically, and concurrent builders (pytest-xdist workers, two processes)
serialise on an ``flock`` of ``<cache_dir>/.lock``.

The guest's ``/init`` is a contract other tests rely on:

1. mount proc, sysfs, devtmpfs and a tmpfs on /run; load the modules; wait up
   to 30 s for ``/dev/vda``.
2. ``mount -t ext4 /dev/vda /mnt`` (the parcel disk: ext4, no partition
   table). If there is no disk or the mount fails it prints ``GUEST: NODISK``.
3. start a memory-only counter in the background: a shell variable bumped
   about every 0.1 s and written to ``/run/counter`` (tmpfs, i.e. RAM). After a
   suspend/resume through QEMU migration it goes on from where it was.
4. print ``GUEST: READY`` on the serial console (ttyS0), then answer commands
   read from ttyS0, one line each, with exactly one reply line that starts with
   ``GUEST: ``:

   =======================  ==============================================
   ``counter``              ``GUEST: COUNTER <n>``
   ``write <name> <text>``  writes <text> (no newline added) to /mnt/<name>,
                            syncs, ``GUEST: OK``
   ``read <name>``          ``GUEST: DATA <content>`` (newlines shown as
                            spaces) or ``GUEST: MISSING``
   ``fill <name> <mib>``    <mib> MiB of /dev/urandom into /mnt/<name>,
                            syncs, ``GUEST: OK``
   ``sha <name>``           ``GUEST: SHA <sha256 hex>`` or ``GUEST: MISSING``
   ``sync``                 ``GUEST: OK``
   ``echo <x>``             ``GUEST: ECHO <x>``
   ``hog <mib>``            <mib> MiB of /dev/urandom into a tmpfs (RAM),
                            then freed again: free memory that is not zero
                            (unless the kernel zeroes freed pages);
                            ``GUEST: OK``
   ``mem``                  ``GUEST: MEM <used KiB> <total KiB>``, the
                            guest's own ``free`` (used = total - available)
   ``poweroff``             sync, umount, ``GUEST: BYE``, ``poweroff -f``
   ``reboot``               sync, umount, ``GUEST: BYE``, ``reboot -f``
   =======================  ==============================================

   A <name> is one path component (no ``/``, not ``.`` or ``..``). Errors
   answer ``GUEST: ERR <why>`` (``ERR nodisk`` when /mnt is not mounted,
   ``ERR unknown <cmd>`` for an unknown command). Empty lines get no reply.
   The tty does not echo what it reads and ends its lines with CR LF.

QEMU: :func:`qemu_base_args` gives the machine, memory, kernel and initrd;
callers add the serial chardev (:func:`serial_args`), QMP, and the disk
(``-drive file=IMG,format=raw,if=none,id=d0 -device virtio-blk-pci,drive=d0``
for a raw file, or ``-blockdev driver=nbd,...`` plus ``-device
virtio-blk-pci,drive=...`` for isrsync's NBD server). The serial socket is a
server with ``wait=off``: output the guest writes while no client is connected
is lost, so connect as soon as QEMU has started (the guest needs seconds to
boot under TCG) and use the ``echo`` command as a readiness probe if in doubt.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from ..errors import QemuError

QEMU_SYSTEM = "qemu-system-x86_64"
# Under TCG "q35" and "pc" boot this guest to READY equally fast (about 2 s on
# a loaded 2-core host, within noise of each other); q35 is the modern machine.
MACHINE = "q35"
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
# init_on_free=1 zeroes freed pages (the decompressor's and initramfs' leftovers,
# page cache dropped later), which QEMU's migration skips as zero pages: the
# memory image of a 256 MiB guest shrinks from about 92 to 53 MiB.
CMDLINE = (
    "console=ttyS0 quiet loglevel=1 panic=-1 rdinit=/init tsc=reliable mitigations=off"
    " init_on_free=1"
)
# Modules the guest cannot work without (skipped when built in), then nice-to-haves.
REQUIRED_MODULES = ("virtio_pci", "virtio_blk", "ext4")
# virtio_balloon: free page reporting (a parcel's VmSpec.free_page_reporting).
OPTIONAL_MODULES = ("crc32c_generic", "virtio_balloon")
DISK_WAIT_S = 30
MANIFEST = "guest.json"
FORMAT = 1

Progress = Callable[[str], None]


class GuestBuildError(QemuError):
    """The test/demo guest could not be built (no package, no busybox, bad kernel)."""

    hint = "check that apt-get can download Debian packages and busybox-static is installed"


@dataclass(frozen=True)
class Guest:
    """A bootable guest: pass ``kernel``/``initrd``/``cmdline`` to QEMU."""

    kernel: Path
    initrd: Path
    cmdline: str
    kernel_version: str


# --------------------------------------------------------------------------- /init

INIT_TEMPLATE = r"""#!/bin/busybox sh
# isrsync test guest /init (see isrsync/vm/guest.py for the contract).
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o mode=0755,size=16m tmpfs /run
echo 1 > /proc/sys/kernel/printk
@INSMODS@
i=0
while [ ! -b /dev/vda ] && [ "$i" -lt @DISK_WAIT_TICKS@ ]; do sleep 0.1; i=$((i+1)); done
DISK=0
if [ -b /dev/vda ] && mount -t ext4 /dev/vda /mnt 2>/dev/null; then
    DISK=1
fi
( n=0; while :; do echo "$n" > /run/counter; n=$((n+1)); sleep 0.1; done ) </dev/null >/dev/null 2>&1 &
exec </dev/ttyS0 >/dev/ttyS0 2>/dev/null
stty -echo
CR=$(printf '\r')
NL='
'
reply() { printf '%s\n' "GUEST: $*"; }
okname() { case "$1" in ''|.|..|*/*) return 1;; esac; return 0; }
[ "$DISK" = 1 ] || reply NODISK
reply READY
while :; do
    if ! IFS= read -r line; then sleep 0.1; continue; fi
    line=${line%"$CR"}
    cmd=${line%% *}
    rest=${line#"$cmd"}; rest=${rest# }
    name=${rest%% *}
    arg=${rest#"$name"}; arg=${arg# }
    case "$cmd" in
    '') continue ;;
    counter)
        # One read(2) by cat: ash's read builtin takes a byte per syscall, and
        # the counter's truncate-and-rewrite between two of them left "1"
        # of "15" (seen right after a lazy resume, when guest faults are slow).
        c=""
        while [ -z "$c" ]; do c=$(cat /run/counter); done
        reply "COUNTER $c" ;;
    echo) reply "ECHO $rest" ;;
    hog)
        case "$name" in ''|*[!0-9]*) reply "ERR bad size"; continue ;; esac
        mkdir -p /tmp/hog
        if mount -t tmpfs -o "size=$((name + 1))m" tmpfs /tmp/hog &&
           dd if=/dev/urandom of=/tmp/hog/x bs=1048576 count="$name" 2>/dev/null; then r=OK; else r="ERR hog"; fi
        rm -f /tmp/hog/x; umount /tmp/hog 2>/dev/null
        reply "$r" ;;
    mem)
        t=$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)
        a=$(sed -n 's/^MemAvailable: *\([0-9]*\).*/\1/p' /proc/meminfo)
        reply "MEM $((t - a)) $t" ;;
    sync) sync; reply OK ;;
    poweroff)
        sync
        [ "$DISK" = 1 ] && umount /mnt
        reply BYE
        sleep 0.5
        poweroff -f ;;
    reboot)
        sync
        [ "$DISK" = 1 ] && umount /mnt
        reply BYE
        sleep 0.5
        reboot -f ;;
    write|read|fill|sha)
        if [ "$DISK" != 1 ]; then reply "ERR nodisk"; continue; fi
        if ! okname "$name"; then reply "ERR bad name"; continue; fi
        f="/mnt/$name"
        case "$cmd" in
        write)
            if printf '%s' "$arg" > "$f" && sync; then reply OK; else reply "ERR write"; fi ;;
        read)
            if [ -f "$f" ]; then
                d=$(cat "$f")
                case "$d" in *"$NL"*|*"$CR"*) d=$(printf '%s' "$d" | tr '\r\n' '  ') ;; esac
                reply "DATA $d"
            else reply MISSING; fi ;;
        fill)
            case "$arg" in ''|*[!0-9]*) reply "ERR bad size"; continue ;; esac
            if dd if=/dev/urandom of="$f" bs=1048576 count="$arg" && sync; then reply OK
            else reply "ERR fill"; fi ;;
        sha)
            if [ -f "$f" ]; then set -- $(sha256sum "$f"); reply "SHA $1"
            else reply MISSING; fi ;;
        esac ;;
    *) reply "ERR unknown $cmd" ;;
    esac
done
"""


def render_init(modules: Iterable[str]) -> str:
    """The /init script loading ``modules`` (initramfs paths) in the given order."""
    insmods = "\n".join(f"insmod {m}" for m in modules) or ":"
    return INIT_TEMPLATE.replace("@INSMODS@", insmods).replace(
        "@DISK_WAIT_TICKS@", str(DISK_WAIT_S * 10)
    )


def _recipe() -> str:
    """What a cached build depends on besides the kernel: a change rebuilds."""
    h = hashlib.sha256()
    for part in (str(FORMAT), INIT_TEMPLATE, CMDLINE, repr(REQUIRED_MODULES), repr(OPTIONAL_MODULES)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- cache


def build_guest(cache_dir: Path, progress: Progress | None = None) -> Guest:
    """Return the guest cached in ``cache_dir``, building it first if needed.

    Idempotent: a complete build (its manifest is written last, atomically) is
    returned at once. Safe to call from several processes at the same time.
    Raises :class:`GuestBuildError` when a package cannot be had.
    """
    say = progress or (lambda _msg: None)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    guest = _load_manifest(cache_dir)
    if guest is not None:
        return guest
    with open(cache_dir / ".lock", "a+b") as lockf:
        fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
        guest = _load_manifest(cache_dir)
        if guest is not None:
            return guest
        return _build(cache_dir, say)


def _load_manifest(cache_dir: Path) -> Guest | None:
    try:
        m = json.loads((cache_dir / MANIFEST).read_text())
        if m.get("format") != FORMAT or m.get("recipe") != _recipe():
            return None
        kernel = cache_dir / m["kernel"]
        initrd = cache_dir / m["initrd"]
        if kernel.stat().st_size != m["kernel_size"] or initrd.stat().st_size != m["initrd_size"]:
            return None
        return Guest(kernel, initrd, m["cmdline"], m["kernel_version"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _build(cache_dir: Path, say: Progress) -> Guest:
    t0 = time.monotonic()
    debs = cache_dir / "debs"
    debs.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
    try:
        kdeb = _kernel_deb(debs, say)
        say(f"unpacking {kdeb.name}")
        kroot = work / "kernel"
        _run(["dpkg-deb", "-x", str(kdeb), str(kroot)])
        vmlinuz = sorted((kroot / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise GuestBuildError(f"{kdeb.name} holds no /boot/vmlinuz-*")
        kver = vmlinuz[-1].name.removeprefix("vmlinuz-")
        moddir = kroot / "lib" / "modules" / kver
        modules = _resolve_modules(moddir)
        say("modules: " + (", ".join(name for name, _ in modules) or "none (all built in)"))
        busybox = _static_busybox(debs, work, say)

        files: list[tuple[str, int, bytes]] = []  # (path, mode, data)
        ins: list[str] = []
        for i, (name, path) in enumerate(modules):
            dest = f"/lib/modules/{i:02d}-{name}.ko"
            files.append((dest, 0o100644, _read_module(path)))
            ins.append(dest)
        files.append(("/bin/busybox", 0o100755, busybox))
        files.append(("/init", 0o100755, render_init(ins).encode()))
        cpio = _newc(
            dirs=["/bin", "/dev", "/proc", "/sys", "/run", "/tmp", "/mnt", "/lib", "/lib/modules"],
            nodes=[("/dev/console", 0o020600, 5, 1), ("/dev/ttyS0", 0o020660, 4, 64),
                   ("/dev/null", 0o020666, 1, 3)],
            files=files,
        )
        initrd_name = f"initrd-{hashlib.sha256(cpio).hexdigest()[:12]}.cpio"
        kernel_name = vmlinuz[-1].name
        _write_atomic(cache_dir / kernel_name, vmlinuz[-1].read_bytes())
        _write_atomic(cache_dir / initrd_name, cpio)
        manifest = {
            "format": FORMAT,
            "recipe": _recipe(),
            "kernel": kernel_name,
            "kernel_size": (cache_dir / kernel_name).stat().st_size,
            "initrd": initrd_name,
            "initrd_size": len(cpio),
            "cmdline": CMDLINE,
            "kernel_version": kver,
            "kernel_package": kdeb.name,
            "modules": [name for name, _ in modules],
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=2).encode())
        # Drop the files of older builds that the new manifest no longer names.
        for old in list(cache_dir.glob("initrd-*.cpio")) + list(cache_dir.glob("vmlinuz-*")):
            if old.name not in (initrd_name, kernel_name):
                with contextlib.suppress(OSError):
                    old.unlink()
        say(f"guest built in {time.monotonic() - t0:.1f}s: kernel {kver}, initrd {len(cpio) // 1024} KiB")
        return Guest(cache_dir / kernel_name, cache_dir / initrd_name, CMDLINE, kver)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- packages


def _run(argv: list[str], cwd: Path | None = None) -> str:
    try:
        p = subprocess.run(argv, check=False, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise GuestBuildError(f"{argv[0]} is not installed") from e
    if p.returncode != 0:
        raise GuestBuildError(f"{' '.join(argv)} failed: {(p.stderr or p.stdout).strip()[-600:]}")
    return p.stdout


def _apt_download(package: str, dest: Path, say: Progress) -> Path:
    """``apt-get download`` one package into ``dest``; return the .deb.

    Runs ``apt-get update`` once (as root) only if the first try fails, which is
    what happens when the package lists are missing or stale.
    """
    argv = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        argv += ["-o", "APT::Sandbox::User=root"]  # root downloading into a dir _apt cannot read
    argv.append(package)
    name = package.split("=", 1)[0]
    for attempt in (1, 2):
        say(f"apt-get download {package}")
        p = subprocess.run(argv, check=False, cwd=dest, capture_output=True, text=True)
        found = sorted(dest.glob(f"{name}_*.deb"), key=lambda q: q.stat().st_mtime)
        if p.returncode == 0 and found:
            return found[-1]
        if attempt == 1 and os.geteuid() == 0:
            say("apt-get update (package lists missing or stale)")
            subprocess.run(["apt-get", "update", "-q"], check=False, capture_output=True, text=True)
            continue
        raise GuestBuildError(
            f"apt-get download {package} failed: {(p.stderr or p.stdout).strip()[-600:]}",
            hint="run `apt-get update` as root and check that Debian's mirror is reachable",
        )
    raise AssertionError("unreachable")


def _kernel_deb(debs: Path, say: Progress) -> Path:
    """The real ``linux-image-<ver>-cloud-amd64`` deb (downloaded once, kept in ``debs``)."""
    meta = _apt_download(KERNEL_META_PACKAGE, debs, say)
    depends = _run(["dpkg-deb", "-f", str(meta), "Depends"])
    real = None
    for alt in re.split(r"[,|]", depends):
        m = re.match(r"\s*(linux-image-[^\s(]+)\s*(?:\(\s*=\s*([^)\s]+)\s*\))?", alt)
        if m:
            real, version = m.group(1), m.group(2)
            break
    if real is None:
        raise GuestBuildError(f"{meta.name} depends on no linux-image package: {depends.strip()!r}")
    existing = sorted(debs.glob(f"{real}_*.deb"))
    if version is not None:
        existing = [d for d in existing if d.name.startswith(f"{real}_{version.replace(':', '%3a')}_")]
    deb = existing[-1] if existing else _apt_download(
        real if version is None else f"{real}={version}", debs, say
    )
    for old in debs.glob("linux-image-*.deb"):  # kernels of earlier builds
        if old not in (meta, deb):
            with contextlib.suppress(OSError):
                old.unlink()
    return deb


def _is_static_elf(data: bytes) -> bool:
    """True for a 64-bit little-endian ELF executable with no PT_INTERP."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        if struct.unpack_from("<I", data, phoff + i * phentsize)[0] == 3:  # PT_INTERP
            return False
    return True


def _static_busybox(debs: Path, work: Path, say: Progress) -> bytes:
    for cand in ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox"):
        with contextlib.suppress(OSError):
            data = Path(cand).read_bytes()
            if _is_static_elf(data):
                return data
    deb = _apt_download(BUSYBOX_PACKAGE, debs, say)
    root = work / "busybox"
    _run(["dpkg-deb", "-x", str(deb), str(root)])
    for cand in ("bin/busybox", "usr/bin/busybox"):
        p = root / cand
        if p.exists() and _is_static_elf(p.read_bytes()):
            return p.read_bytes()
    raise GuestBuildError(f"{deb.name} holds no static busybox")


# --------------------------------------------------------------------------- modules


def _modname(filename: str) -> str:
    base = filename.split(".ko", 1)[0]
    return base.replace("-", "_")


def _read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed (busybox insmod takes plain .ko only)."""
    raw = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(raw)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(raw)
    if path.name.endswith(".ko.zst"):
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def _modinfo(elf: bytes) -> dict[str, list[str]]:
    """The ``key=value`` strings of a module's .modinfo ELF section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise GuestBuildError("kernel module is not a 64-bit ELF object")
    shoff = struct.unpack_from("<Q", elf, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * shentsize) for i in range(shnum)]
    strtab = secs[shstrndx][4]
    out: dict[str, list[str]] = {}
    for s in secs:
        nm = elf[strtab + s[0] : elf.index(b"\0", strtab + s[0])]
        if nm == b".modinfo":
            for item in elf[s[4] : s[4] + s[5]].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode(errors="replace").split("=", 1)
                    out.setdefault(k, []).append(v)
    return out


def _resolve_modules(moddir: Path) -> list[tuple[str, Path]]:
    """The modules to load, dependencies first, skipping those built in.

    Dependencies come from each module's own ``depends=`` (and ``softdep=pre:``)
    modinfo, so this works without the ``modules.dep`` that depmod would make
    (Debian's kernel package does not ship one).
    """
    builtin: set[str] = set()
    with contextlib.suppress(OSError):
        for line in (moddir / "modules.builtin").read_text().splitlines():
            if line.strip():
                builtin.add(_modname(line.strip().rsplit("/", 1)[-1]))
    index: dict[str, Path] = {}
    for p in (moddir / "kernel").rglob("*.ko*"):
        if re.search(r"\.ko(\.xz|\.gz|\.zst)?$", p.name):
            index.setdefault(_modname(p.name), p)

    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str, required: bool, stack: tuple[str, ...] = ()) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        if name in stack:
            raise GuestBuildError(f"module dependency loop: {' -> '.join(stack + (name,))}")
        path = index.get(name)
        if path is None:
            if required:
                raise GuestBuildError(f"kernel module {name} is neither built in nor shipped")
            return
        info = _modinfo(_read_module(path))
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(dep, True, stack + (name,))
        for soft in info.get("softdep", []):
            m = re.search(r"pre:\s*([^:]*?)(?:\s+post:|$)", soft)
            for dep in (m.group(1).split() if m else []):
                visit(dep, False, stack + (name,))
        seen.add(name)
        order.append((name, path))

    for name in REQUIRED_MODULES:
        visit(name, True)
    for name in OPTIONAL_MODULES:
        visit(name, False)
    return order


# --------------------------------------------------------------------------- cpio


def _newc(
    dirs: list[str], nodes: list[tuple[str, int, int, int]], files: list[tuple[str, int, bytes]]
) -> bytes:
    """A newc ("070701") cpio archive, owned by root, without needing root to make."""
    out = bytearray()
    ino = 1

    def entry(name: str, mode: int, data: bytes = b"", rmaj: int = 0, rmin: int = 0) -> None:
        nonlocal ino
        nm = name.lstrip("/").encode() + b"\0"
        nlink = 2 if stat.S_ISDIR(mode) else 1
        fields = (ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rmaj, rmin, len(nm), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + nm)
        out.extend(b"\0" * (-len(out) % 4))
        out.extend(data)
        out.extend(b"\0" * (-len(out) % 4))
        ino += 1

    for d in dirs:
        entry(d, stat.S_IFDIR | 0o755)
    for name, mode, major, minor in nodes:
        entry(name, mode, rmaj=major, rmin=minor)
    for name, mode, data in files:
        entry(name, mode, data)
    ino = 0
    entry("TRAILER!!!", 0)
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


# --------------------------------------------------------------------------- disk


def make_disk_image(path: Path, size_mib: int, files: dict[str, bytes] | None = None) -> None:
    """Create a raw ext4 image (no partition table) holding ``files`` at its root.

    Names in ``files`` are relative paths (subdirectories are created). The
    image is sparse; this is what the guest mounts as /dev/vda on /mnt.
    """
    path = Path(path)
    if size_mib < 2:
        raise ValueError("an ext4 image needs at least 2 MiB")
    with tempfile.TemporaryDirectory(prefix=".disk-", dir=path.parent) as tmp:
        root = Path(tmp) / "root"
        root.mkdir()
        for name, data in (files or {}).items():
            dest = (root / name).resolve()
            if not dest.is_relative_to(root.resolve()) or dest == root.resolve():
                raise ValueError(f"bad file name for the disk image: {name!r}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
        with open(path, "wb") as f:
            f.truncate(size_mib * 1024 * 1024)
        try:
            _run(["mkfs.ext4", "-F", "-q", "-L", "parcel", "-E", "root_owner=0:0",
                  "-d", str(root), str(path)])
        except GuestBuildError as e:
            with contextlib.suppress(OSError):
                path.unlink()
            raise QemuError(f"cannot make the disk image {path}: {e.message}",
                            hint="install e2fsprogs (mkfs.ext4 >= 1.43 for -d)") from e


# --------------------------------------------------------------------------- QEMU


def qemu_accel() -> str:
    """``"kvm"`` if /dev/kvm opens read-write and the CPU has vmx or svm, else ``"tcg"``.

    Both are needed: a /dev/kvm without hardware virtualisation (nested, some
    containers) lets QEMU start and then hangs the guest.
    """
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return "tcg"
    os.close(fd)
    try:
        flags = set()
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        return "tcg"
    return "kvm" if flags & {"vmx", "svm"} else "tcg"


def qemu_base_args(guest: Guest, memory_mib: int, accel: str) -> list[str]:
    """The QEMU arguments (after the binary, :data:`QEMU_SYSTEM`) common to every run.

    Leaves out the serial port (add :func:`serial_args`), QMP, ``-incoming``
    and the disk, which callers attach themselves. Source and destination of a
    migration must use the same base args. ``-no-reboot`` makes a guest panic
    (``panic=-1`` reboots at once) end QEMU instead of looping.
    """
    return [
        "-machine", f"{MACHINE},accel={accel}",
        "-m", str(memory_mib),
        "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-vga", "none",
        "-no-reboot",
        "-kernel", str(guest.kernel),
        "-initrd", str(guest.initrd),
        "-append", guest.cmdline,
    ]


def serial_args(socket_path: Path | str, chardev_id: str = "ser0") -> list[str]:
    """Serial console (the guest's ttyS0) on a unix socket QEMU listens on."""
    return [
        "-chardev", f"socket,id={chardev_id},path={socket_path},server=on,wait=off",
        "-serial", f"chardev:{chardev_id}",
    ]
