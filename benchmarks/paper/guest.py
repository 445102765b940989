"""The evaluation guest: Debian bookworm with systemd on an ext4 root, built once and cached.

:func:`build_debian_guest` makes, with ``debootstrap`` from the Debian mirror
this machine's apt sources name, a minbase root with systemd, python3, the
compressors and Debian's cloud kernel (``linux-image-cloud-amd64``, its
initramfs made by initramfs-tools inside the root). The root gets the
workload agent (:mod:`benchmarks.paper.agent`) as a systemd service on ttyS0
and the workload's data set (:func:`write_dataset`: documents and a CSV,
about 30 MiB, the same bytes on every build), and is written into a sparse
ext4 image (``mkfs.ext4 -d``, no loop mount, no partition table: the kernel
mounts ``/dev/vda``) of ``disk_mib``.

The result lives in ``<cache>/<recipe hash>/`` (``/var/cache/isrsync-eval`` by
default): ``vmlinuz``, ``initrd.img``, ``root.img`` and ``guest.json`` written
last, so a directory with ``guest.json`` is complete. A build holds an
``flock`` on ``<cache>/.lock``. The hash covers everything that goes into the
image (packages, suite, size, kernel command line, agent, data-set recipe,
and ``layout``, bumped by hand when :func:`_configure` changes), so changing
the agent makes a new image rather than reusing a stale one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = Path("/var/cache/isrsync-eval")
SUITE = "bookworm"
PACKAGES = ("systemd", "systemd-sysv", "udev", "linux-image-cloud-amd64", "initramfs-tools", "python3", "xz-utils",
            "bzip2", "procps")
DISK_MIB = 2048
MEMORY_MIB = 256  # the paper's guest
CMDLINE = ("root=/dev/vda rw rootfstype=ext4 console=ttyS0 quiet loglevel=1 systemd.show_status=0 "
           "rd.udev.log_level=0 init_on_free=1 mitigations=off tsc=reliable panic=-1 net.ifnames=0")
DATASET_FORMAT = 1
DOCS = 160  # documents of DOC_KIB each, plus the CSV: about 30 MiB in all
DOC_KIB = 128
CSV_ROWS = 60000

Say = Callable[[str], None]


class GuestBuildFailed(RuntimeError):
    """debootstrap, the kernel or mkfs failed; the message says which step and why."""


@dataclass(frozen=True)
class DebianGuest:
    kernel: Path
    initrd: Path
    image: Path
    cmdline: str
    disk_mib: int
    build_seconds: float
    recipe: str


def mirror() -> str:
    """The Debian mirror this machine's apt uses (deb822 or one-line sources), deb.debian.org otherwise."""
    found: list[str] = []
    for p in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if p.suffix not in (".list", ".sources") or not p.is_file():
            continue
        for line in p.read_text(errors="replace").splitlines():
            m = re.match(r"\s*(?:URIs:|deb)\s+(\S+)", line)
            if m and "security" not in m.group(1) and m.group(1).startswith("http"):
                found.append(m.group(1).rstrip("/"))
    debian = [u for u in found if u.endswith("/debian")]
    return (debian or found or ["http://deb.debian.org/debian"])[0]


def recipe(disk_mib: int) -> str:
    """A hash of everything that goes into the image."""
    h = hashlib.sha256()
    h.update(json.dumps({"suite": SUITE, "packages": PACKAGES, "disk_mib": disk_mib, "cmdline": CMDLINE,
                         "dataset": [DATASET_FORMAT, DOCS, DOC_KIB, CSV_ROWS], "layout": 2}).encode())
    h.update((HERE / "agent.py").read_bytes())
    return h.hexdigest()[:16]


def cached(cache: Path = DEFAULT_CACHE, disk_mib: int = DISK_MIB) -> DebianGuest | None:
    d = cache / recipe(disk_mib)
    try:
        meta = json.loads((d / "guest.json").read_text())
    except (OSError, ValueError):
        return None
    return DebianGuest(d / "vmlinuz", d / "initrd.img", d / "root.img", meta["cmdline"], meta["disk_mib"],
                       meta["build_seconds"], meta["recipe"])


def build_debian_guest(cache: Path = DEFAULT_CACHE, disk_mib: int = DISK_MIB, say: Say = lambda m: None
                       ) -> DebianGuest:
    """The cached guest, or build it (minutes: debootstrap downloads about 150 MB of packages)."""
    got = cached(cache, disk_mib)
    if got is not None:
        return got
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "a+") as lockf:
        fcntl.flock(lockf.fileno(), fcntl.LOCK_EX)
        got = cached(cache, disk_mib)  # another builder finished while we waited
        if got is not None:
            return got
        return _build(cache / recipe(disk_mib), disk_mib, say)


def _sh(argv: list[str], what: str, timeout: float = 1800) -> str:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if p.returncode != 0:
        raise GuestBuildFailed(f"{what} failed ({p.returncode}): {(p.stderr or p.stdout).strip()[-800:]}")
    return p.stdout


def _need(tool: str, package: str, say: Say) -> None:
    if shutil.which(tool) or Path(f"/usr/sbin/{tool}").exists():
        return
    say(f"installing {package} with apt-get (needed to build the guest)")
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=False)
    _sh(["apt-get", "install", "-y", "-q", package], f"apt-get install {package}")


def _build(out: Path, disk_mib: int, say: Say) -> DebianGuest:
    t0 = time.perf_counter()
    _need("debootstrap", "debootstrap", say)
    _need("mkfs.ext4", "e2fsprogs", say)
    tmp = Path(tempfile.mkdtemp(prefix="build-", dir=out.parent))
    try:
        root = tmp / "root"
        src = mirror()
        say(f"debootstrap {SUITE} from {src} (minbase + {len(PACKAGES)} packages; a few minutes)")
        _sh(["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(root), src],
            "debootstrap")
        _configure(root)
        say("writing the workload's data set")
        write_dataset(root / "srv" / "data")
        boot = root / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        initrds = sorted(boot.glob("initrd.img-*"))
        if not kernels or not initrds:
            raise GuestBuildFailed(f"no kernel or initramfs in {boot}: {sorted(p.name for p in boot.iterdir())}")
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernels[-1], out / "vmlinuz")
        shutil.copyfile(initrds[-1], out / "initrd.img")
        say(f"mkfs.ext4 -d: a {disk_mib} MiB sparse image of the root")
        img = out / "root.img"
        img.unlink(missing_ok=True)
        _sh(["mkfs.ext4", "-q", "-F", "-L", "isr-root", "-E", "lazy_itable_init=0,lazy_journal_init=0",
             "-d", str(root), str(img), f"{disk_mib}M"], "mkfs.ext4 -d")
        secs = time.perf_counter() - t0
        meta = {"cmdline": CMDLINE, "disk_mib": disk_mib, "build_seconds": round(secs, 1), "recipe": recipe(disk_mib),
                "kernel": kernels[-1].name, "mirror": src, "suite": SUITE, "packages": PACKAGES}
        part = out / "guest.json.part"
        part.write_text(json.dumps(meta, indent=1))
        os.replace(part, out / "guest.json")
        say(f"guest built in {secs:.0f}s: {out}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    got = cached(out.parent, disk_mib)
    assert got is not None
    return got


AGENT_UNIT = """[Unit]
Description=isrsync evaluation workload agent on ttyS0
After=local-fs.target
DefaultDependencies=no

[Service]
ExecStart=/usr/bin/python3 /usr/local/bin/isr-agent /dev/ttyS0
Restart=always
RestartSec=1

[Install]
WantedBy=multi-user.target
"""

# Units that would wake the guest up on their own (timers, getty on the
# agent's console) or wait for a network it does not have.
MASK = ("serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer", "apt-daily-upgrade.timer",
        "dpkg-db-backup.timer", "e2scrub_all.timer", "fstrim.timer", "systemd-tmpfiles-clean.timer",
        "systemd-networkd-wait-online.service", "e2scrub_reap.service")


def _configure(root: Path) -> None:
    (root / "etc" / "hostname").write_text("isr-eval\n")
    (root / "etc" / "fstab").write_text("/dev/vda / ext4 rw,noatime 0 1\n")
    shutil.copyfile(HERE / "agent.py", root / "usr" / "local" / "bin" / "isr-agent")
    (root / "usr" / "local" / "bin" / "isr-agent").chmod(0o755)
    unit = root / "etc" / "systemd" / "system"
    (unit / "isr-agent.service").write_text(AGENT_UNIT)
    wants = unit / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        (wants / "isr-agent.service").symlink_to("/etc/systemd/system/isr-agent.service")
    for m in MASK:
        p = unit / m
        p.unlink(missing_ok=True)
        p.symlink_to("/dev/null")
    # Journald in RAM only: its writes to the disk would count as the user's.
    jd = root / "etc" / "systemd" / "journald.conf.d"
    jd.mkdir(parents=True, exist_ok=True)
    (jd / "isr.conf").write_text("[Journal]\nStorage=volatile\n")
    (root / "var" / "tmp" / "isr-work").mkdir(parents=True, exist_ok=True)
    # Nothing of the host's apt caches in the image.
    for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for f in (root / d).glob("*.deb" if "archives" in d else "*_*"):
            f.unlink(missing_ok=True)


WORDS = ("budget quarterly customer invoice delta report contract forecast margin revenue the of and to in is for "
         "that with on as by this be are from at or an project team meeting schedule review draft final plan "
         "cost sales north south region product market growth risk action item owner deadline approve").split()


def write_dataset(d: Path, docs: int = DOCS, doc_kib: int = DOC_KIB, rows: int = CSV_ROWS) -> int:
    """The workload's documents (word salad, compressible like prose) and a spreadsheet-sized CSV.

    Same seed, same bytes: every build of the guest holds the same data set.
    Returns the bytes written.
    """
    rnd = random.Random(2005)
    (d / "docs").mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(docs):
        words: list[str] = []
        size = 0
        while size < doc_kib * 1024:
            line = " ".join(rnd.choice(WORDS) for _ in range(12)) + "\n"
            words.append(line)
            size += len(line)
        data = "".join(words).encode()
        (d / "docs" / f"doc{i:03d}.txt").write_bytes(data)
        total += len(data)
    lines = ["id,region,product,amount,owner\n"]
    for i in range(rows):
        lines.append(f"{i},{rnd.choice(WORDS)},{rnd.choice(WORDS)}{rnd.randrange(1000)},"
                     f"{rnd.randrange(10**7)},{rnd.choice(WORDS)}\n")
    data = "".join(lines).encode()
    (d / "sheet.csv").write_bytes(data)
    return total + len(data)
