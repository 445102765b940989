"""Trickle (settled dirty chunks go up while the guest runs, so a suspend sends
only the residue) and init from a qcow2 image (read through qemu-nbd, no
plaintext temporary)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

from isrsync.demo.console import GuestConsole
from isrsync.demo.guest import make_disk_image


async def test_trickle_uploads_settled_chunks_and_suspend_sends_the_residue(api_parcel) -> None:
    rt = api_parcel.runtime(trickle_settle=1.0)
    await rt.resume()
    con = await asyncio.to_thread(GuestConsole, api_parcel.short / "ser")
    await asyncio.to_thread(con.wait_for, "GUEST: READY")
    assert (await asyncio.to_thread(con.command, "fill big 4")) == "GUEST: OK"  # 4 MiB of random data
    deadline = time.monotonic() + 60
    while True:
        st = rt.status()
        if st.trickled_chunks >= 32 and st.residue_chunks < st.dirty_chunks:
            break
        assert time.monotonic() < deadline, st
        await asyncio.sleep(0.5)
    con.close()
    trickled = rt.status().trickled_chunks
    res = await rt.suspend()
    assert res.committed is True
    versions = await api_parcel.site.store.list_versions(api_parcel.pid)
    # The random 4 MiB went up with the trickle (staged packs the commit named);
    # the suspend itself uploaded the residue and the memory image only.
    assert trickled >= 32
    assert versions[-1].new_pack_bytes >= 4 << 20


def test_init_from_qcow2_reads_the_image_without_a_plaintext_temporary(sites, guest, tmp_path: Path) -> None:
    a = sites("q")
    raw = tmp_path / "disk.img"
    make_disk_image(raw, 64, {"hello.txt": b"from qcow2"})
    q = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(q)], check=True)
    raw.unlink()
    a.run("init", "vq", "--image", str(q), "--kernel", str(guest.kernel), "--initrd", str(guest.initrd),
          "--append", guest.cmdline)
    proc, ev, con = a.resume("vq")
    assert ev["cold_boot"] is True
    con.wait_for("GUEST: READY", 120)
    assert con.command("read hello.txt") == "GUEST: DATA from qcow2"
    con.close()
    assert a.json("suspend", "vq")["committed"] is True
    a.ended(proc)
