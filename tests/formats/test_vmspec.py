"""The typed machine description (isrsync.vmspec) and its place in a manifest."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid

import pytest

from isrsync import manifest as mf
from isrsync.chunk import CHUNK_SIZE
from isrsync.errors import FormatError
from isrsync.manifest import Keyring, decode, encode
from isrsync.vmspec import REF_BYTES, Accel, BootBlob, BootSpec, VmSpec

PARCEL = uuid.UUID("12345678-1234-5678-1234-567812345678")
KEY = hashlib.sha256(b"vmspec key").digest()


def blob(length: int) -> BootBlob:
    return BootBlob(length, b"\x07" * (-(-length // CHUNK_SIZE) * REF_BYTES))


def test_every_field_round_trips_through_json_and_a_manifest() -> None:
    spec = VmSpec(memory_mib=512, cpus=2, machine="pc", cpu_model="host", accel=Accel.KVM,
                  boot=BootSpec(kernel=blob(3 * CHUNK_SIZE + 1), initrd=blob(10), cmdline="console=ttyS0"))
    assert VmSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    m = decode(encode(parcel=PARCEL, version=1, master_key=KEY, vm=spec, keyring=Keyring(CHUNK_SIZE)), KEY)
    assert m.vm == spec and m.vm.boot is not None and m.vm.boot.kernel is not None
    assert m.vm.boot.kernel.length == 3 * CHUNK_SIZE + 1
    assert spec.hardware_tag == "x86_64 mem=512M cpus=2 machine=pc cpu=host"


def test_keys_this_version_does_not_know_survive_a_round_trip() -> None:
    newer = {"memory_mib": 64, "devices": [{"kind": "usb-tablet"}], "tpm": True}
    spec = VmSpec.from_json(newer)
    assert spec.memory_mib == 64 and spec.extra == {"devices": [{"kind": "usb-tablet"}], "tpm": True}
    assert {k: v for k, v in spec.to_json().items() if k in newer} == newer


def test_an_old_manifest_without_some_keys_gets_the_defaults() -> None:
    spec = VmSpec.from_json({"memory_mib": 128, "boot": {}})
    assert (spec.cpus, spec.machine, spec.cpu_model, spec.accel, spec.boot) == (1, "q35", "max", Accel.AUTO, None)
    assert VmSpec.from_json({"boot": {"kernel": blob(5).to_json(), "cmdline": ""}}).boot == BootSpec(kernel=blob(5))


@pytest.mark.parametrize("bad", [
    [], "q35", {"memory_mib": "256"}, {"cpus": 1.5}, {"cpus": True}, {"memory_mib": 0}, {"machine": 35},
    {"accel": "hvf"}, {"boot": {"kernel": {"length": 10}}}, {"boot": {"kernel": {"length": 10, "refs": "zz"}}},
    {"boot": {"kernel": {"length": CHUNK_SIZE + 1, "refs": "07" * REF_BYTES}}}, {"boot": {"cmdline": 3}},
])
def test_a_malformed_description_is_a_format_error(bad: object) -> None:
    with pytest.raises(FormatError):
        VmSpec.from_json(bad)


def test_a_manifest_with_a_malformed_machine_is_refused() -> None:
    m = decode(encode(parcel=PARCEL, version=1, master_key=KEY, vm=VmSpec(), keyring=Keyring(CHUNK_SIZE)), KEY)
    meta = {"vm": {"cpus": "two"}, "disk_size": CHUNK_SIZE, "memory_length": None, "site": "", "time": 0.0,
            "codec": mf.CODEC_VERSION}
    raw = json.dumps(meta).encode()
    inner = mf.BODY_MAGIC + struct.pack("<I", len(raw)) + raw
    inner += struct.pack("<BQ", mf.S_KEYRING_FULL, len(Keyring(CHUNK_SIZE).to_bytes())) + Keyring(CHUNK_SIZE).to_bytes()
    with pytest.raises(FormatError, match="wrong type"):
        mf._parse_inner(m.header, m.hash, inner)


def test_free_page_reporting_is_a_machine_field_off_for_older_parcels() -> None:
    on = VmSpec(free_page_reporting=True)
    assert on.to_json()["free_page_reporting"] is True
    assert VmSpec.from_json(json.loads(json.dumps(on.to_json()))) == on
    # Written only when on: an older parcel's machine stays byte for byte what it was.
    assert "free_page_reporting" not in VmSpec().to_json()
    assert VmSpec.from_json({}).free_page_reporting is False
    with pytest.raises(FormatError):
        VmSpec.from_json({"free_page_reporting": "yes"})
