"""The machine a parcel describes: the ``vm`` object of a manifest's metadata, typed.

A format module (no I/O). The manifest keeps it as JSON (docs/manifest.md); this
module is the one place that reads and writes that object, so the rest of the
code sees fields with types rather than a dict it has to poke at with defaults.

Keys this version does not know are kept verbatim in :attr:`VmSpec.extra` and
written back unchanged: a manifest written by a newer isrsync survives a commit
made by an older one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from .chunk import KEY_SIZE, TAG_SIZE, chunk_count
from .errors import FormatError

# The size of one keyring entry in a boot blob's ``refs`` (tag, key, flags).
REF_BYTES = TAG_SIZE + KEY_SIZE + 1
_KNOWN = ("memory_mib", "cpus", "machine", "cpu_model", "accel", "boot", "free_page_reporting")


class Accel(str, Enum):
    """What the parcel asks of the site's accelerator."""

    AUTO = "auto"  # KVM where it works, TCG elsewhere
    KVM = "kvm"  # the parcel was set up to need KVM: a TCG-only site refuses it


@dataclass(frozen=True)
class BootBlob:
    """A boot file (kernel or initrd) kept in the parcel: its length and its keyring records."""

    length: int
    refs: bytes  # chunk_count(length) keyring records, REF_BYTES each

    def __post_init__(self) -> None:
        if self.length < 0 or len(self.refs) != chunk_count(self.length) * REF_BYTES:
            raise FormatError("a boot file's records do not match its length")

    def to_json(self) -> dict[str, Any]:
        return {"length": self.length, "refs": self.refs.hex()}

    @classmethod
    def from_json(cls, d: Any) -> BootBlob:
        if not isinstance(d, dict) or not isinstance(d.get("length"), int) or not isinstance(d.get("refs"), str):
            raise FormatError("a boot file entry is malformed")
        try:
            refs = bytes.fromhex(d["refs"])
        except ValueError:
            raise FormatError("a boot file's records are not hex") from None
        return cls(d["length"], refs)


@dataclass(frozen=True)
class BootSpec:
    """What a cold boot loads: kernel and initrd from the parcel, and the kernel command line."""

    kernel: BootBlob | None = None
    initrd: BootBlob | None = None
    cmdline: str = ""

    def blobs(self) -> list[tuple[str, BootBlob]]:
        return [(name, b) for name, b in (("kernel", self.kernel), ("initrd", self.initrd)) if b is not None]

    def to_json(self) -> dict[str, Any]:
        return {**{name: b.to_json() for name, b in self.blobs()}, "cmdline": self.cmdline}

    @classmethod
    def from_json(cls, d: Any) -> BootSpec:
        if not isinstance(d, dict) or not isinstance(d.get("cmdline", ""), str):
            raise FormatError("the boot entry is malformed")
        # Written as {} (or with empty entries) by some versions: no file.
        blob = lambda key: BootBlob.from_json(d[key]) if d.get(key) else None  # noqa: E731
        return cls(blob("kernel"), blob("initrd"), d.get("cmdline") or "")


@dataclass(frozen=True)
class VmSpec:
    """The guest machine: what QEMU is asked for, and what a site needs to run it."""

    memory_mib: int = 256
    cpus: int = 1
    machine: str = "q35"
    cpu_model: str = "max"
    accel: Accel = Accel.AUTO
    boot: BootSpec | None = None
    # A virtio-balloon with free page reporting: the guest hands its free memory
    # back, QEMU punches it out of the RAM memfd, and a suspend neither saves nor
    # sends it. A device of the machine: a memory image saved with it restores only
    # with it, so parcels made before it (no key) run without.
    free_page_reporting: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.memory_mib < 1 or self.cpus < 1:
            raise FormatError("the machine has no memory or no CPU")
        if set(self.extra) & set(_KNOWN):
            raise ValueError("extra repeats a known key")

    @property
    def hardware_tag(self) -> str:
        """The short description the server shows beside the parcel's name."""
        return f"x86_64 mem={self.memory_mib}M cpus={self.cpus} machine={self.machine} cpu={self.cpu_model}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            **self.extra, "memory_mib": self.memory_mib, "cpus": self.cpus, "machine": self.machine,
            "cpu_model": self.cpu_model, "accel": self.accel.value,
        }
        if self.boot is not None:
            out["boot"] = self.boot.to_json()
        if self.free_page_reporting:
            out["free_page_reporting"] = True
        return out

    @classmethod
    def from_json(cls, d: Any) -> VmSpec:
        """Read the manifest's ``vm`` object; a missing key takes its default, a wrong type is a FormatError."""
        if not isinstance(d, dict):
            raise FormatError("the machine description is not an object")
        ints = {k: d.get(k, getattr(cls, k)) for k in ("memory_mib", "cpus")}
        strs = {k: d.get(k, getattr(cls, k)) for k in ("machine", "cpu_model")}
        if any(type(v) is not int for v in ints.values()) or any(not isinstance(v, str) for v in strs.values()):
            raise FormatError("the machine description has a field of the wrong type")
        try:
            accel = Accel(d.get("accel", "auto"))
        except ValueError:
            raise FormatError(f"the machine asks for an unknown accelerator {d.get('accel')!r}") from None
        boot = BootSpec.from_json(d["boot"]) if d.get("boot") else None
        fpr = d.get("free_page_reporting", False)
        if not isinstance(fpr, bool):
            raise FormatError("the machine description has a field of the wrong type")
        extra = {k: v for k, v in d.items() if k not in _KNOWN}
        return cls(**ints, **strs, accel=accel, boot=boot, free_page_reporting=fpr, extra=extra)
