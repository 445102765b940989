"""Making a parcel: an image (raw or qcow2) and optional boot files become version 1.

The image is encoded chunk by chunk into packs in a staging directory of the site
cache, the packs are uploaded, and the creating site keeps them (it starts fully
hoarded). The parcel's key is sealed on the server before anything uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

from .. import manifest
from ..chunk import VerifiedChunk
from ..errors import UsageError
from ..keys import new_master_key
from ..store.base import CommitRequest, VersionInfo
from ..vmspec import BootBlob, BootSpec, VmSpec
from .account import add_parcel_key
from .packer import DEFAULT_PACK_LIMIT, pack_stream
from .parcel import Site, upload_cached
from .upload import upload_packs


def image_format(path: Path) -> tuple[str, int]:
    try:
        out = subprocess.run(
            ["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, timeout=60, check=True
        ).stdout
    except FileNotFoundError:
        raise UsageError("qemu-img is not installed", hint="run scripts/setup") from None
    except subprocess.CalledProcessError as e:
        raise UsageError(f"cannot read the image {path}: {e.stderr.strip()[:200]}") from None
    info = json.loads(out)
    fmt = info["format"]
    if fmt not in ("raw", "qcow2"):
        raise UsageError(f"the image {path} is {fmt}; isrsync takes raw or qcow2")
    return fmt, int(info["virtual-size"])


@contextlib.contextmanager
def raw_stream(path: Path, fmt: str):
    """A readable raw stream of an image; qcow2 is served by qemu-nbd and copied
    by nbdcopy into a pipe, so its plaintext never lands in a temporary file."""
    if fmt == "raw":
        with open(path, "rb") as f:
            yield f
        return
    tmp = Path(tempfile.mkdtemp(prefix="isrsync-img-"))
    sock = tmp / "nbd.sock"
    server = subprocess.Popen(
        ["qemu-nbd", "--read-only", "--format", fmt, "--socket", str(sock), "--shared", "1", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    copy = None
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        copy = subprocess.Popen(["nbdcopy", f"nbd+unix:///?socket={sock}", "-"], stdout=subprocess.PIPE)
        assert copy.stdout is not None
        yield copy.stdout
    finally:
        if copy is not None:
            copy.kill()
            copy.wait()
        server.kill()
        server.wait()
        shutil.rmtree(tmp, ignore_errors=True)


async def init_parcel(
    site: Site,
    name: str,
    image: Path,
    *,
    memory_mib: int = 256,
    cpus: int = 1,
    machine: str = "q35",
    cpu_model: str = "max",
    kernel: Path | None = None,
    initrd: Path | None = None,
    append: str | None = None,
    free_page_reporting: bool = True,
    encode_progress: Callable[[int, int], None] | None = None,
    upload_progress: Callable[[int, int], None] | None = None,
) -> tuple[uuid.UUID, VersionInfo]:
    """Turn an image into a parcel at version 1 (no memory image: it cold-boots)."""
    fmt, size = image_format(image)
    parcel = uuid.uuid4()
    vm = VmSpec(memory_mib=memory_mib, cpus=cpus, machine=machine, cpu_model=cpu_model,
                free_page_reporting=free_page_reporting)
    # The key is stored (sealed) on the server before anything uses it: a parcel
    # can never exist whose key was lost.
    site.bundle = await add_parcel_key(site.store, site.acct, str(parcel), new_master_key())
    await site.store.create_parcel(parcel, name, vm.hardware_tag)
    staging = Path(tempfile.mkdtemp(prefix=".init-", dir=site.cache.path / "packs"))
    try:
        done = [0]

        def adv(n: int) -> None:
            done[0] += n
            if encode_progress:
                encode_progress(done[0], size)

        with raw_stream(image, fmt) as src:
            packed = await asyncio.to_thread(
                pack_stream, src, size, site.secret(), staging, progress=adv, limit=DEFAULT_PACK_LIMIT
            )
        packs = list(packed.packs)
        added = set(packed.keyring.tags())
        boot: dict[str, BootBlob] = {}
        for key, path in (("kernel", kernel), ("initrd", initrd)):
            if path is not None:
                blob_size = path.stat().st_size
                with open(path, "rb") as f:
                    bp = await asyncio.to_thread(pack_stream, f, blob_size, site.secret(), staging)
                packs += bp.packs
                added |= bp.keyring.tags()
                boot[key] = BootBlob(blob_size, bp.keyring.to_bytes())
        if boot:
            vm = dataclasses.replace(vm, boot=BootSpec(**boot, cmdline=append or ""))
        total = sum(i.size for i, _ in packs)
        sent = [0]

        def up(n: int) -> None:
            sent[0] += n
            if upload_progress:
                upload_progress(sent[0], total)

        await upload_packs(site.store, parcel, packs, progress=up)
        for info, path in packs:  # the creating site starts fully hoarded
            await asyncio.to_thread(site.cache.add_pack, path, info.pack_id)
        # A big disk's keyring goes up as segments, so a resume fetches only those it needs.
        sealed = await asyncio.to_thread(
            manifest.seal, parcel=parcel, version=1, master_key=site.master_key(parcel), vm=vm,
            keyring=packed.keyring, site=site.host, time=time.time(),
        )
        segs = [VerifiedChunk(e.tag, e.data) for e in sealed.segments if e.data]
        seg_packs = []
        if segs:
            await asyncio.to_thread(site.cache.put_verified, segs)
            seg_packs = await upload_cached(site, parcel, [c.tag for c in segs], strict=True)
            added |= {c.tag for c in segs}
        lock = await site.store.acquire(parcel, site.holder())
        v = await site.store.commit(parcel, CommitRequest(
            epoch=lock.epoch, parent=0, manifest=sealed.raw,
            packs=[*(i.pack_id for i, _ in packs), *(i.pack_id for i in seg_packs)],
            added=sorted(added), release=True, site=site.site_id,
        ))
        return parcel, v
    finally:
        shutil.rmtree(staging, ignore_errors=True)
