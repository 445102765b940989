"""The paper-evaluation harness (benchmarks/paper) end to end at smoke size, and its Debian guest.

The smoke run is the real harness (``python -m benchmarks.paper``): the home
server, sites A and B and a jukebox site J each in a network namespace of its
own on one bridge, the server's link tbf-shaped, the reference on plain QEMU and
every policy at 100 Mb/s, with the busybox test guest and four operations
(about a minute here), so the harness cannot rot unseen. Its figures are not
asserted against targets (they are benchmark output); what is asserted is that
each part really ran: bytes moved by each policy in the order the policies
imply, operation times from every run, the jukebox run reading chunks from its
LAN peer, the report and the plots written, the namespaces gone.

The Debian guest test boots the evaluation guest (built once into
/var/cache/isrsync-eval: about 140 s to build on a loaded 2-core machine,
debootstrap 80 s of it; about 45 s to boot under TCG) and runs a few
operations of the workload through its agent.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for ip netns and tc")


def _netns() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    return {ln.split()[0] for ln in out.splitlines() if ln.strip()}


def test_harness_runs_every_policy_and_writes_report_plots_and_json(tmp_path: Path, guest) -> None:
    out = tmp_path / "out"
    # As if this small run stood for a full-size one with a 1 GB memory image: the paper's figures are scaled.
    full = tmp_path / "full.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ISRSYNC_TEST_GUEST_CACHE": str(guest.kernel.parent)}
    full.write_text(json.dumps({"state": {"bytes": 4 * 10**9, "memory_bytes": 10**9}}))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "benchmarks.paper", "--guest", "busybox", "--ops", "4",
                        "--think-ms", "20", "--rates", "100mbit", "--memory-mib", "128", "--full-size", str(full),
                        "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert time.monotonic() - t0 < 150
    # Its own namespaces, by name (other namespaces come and go on a shared machine).
    m = re.search(r"home server in namespace (\S+)-server", p.stderr)
    assert m and not any(n.startswith(m.group(1)) for n in _netns()), "the harness left its namespaces behind"

    res = json.loads((out / "results.json").read_text())
    runs = {r["policy"]: r for r in res["runs"]}
    assert set(runs) == {"baseline", "proactive", "demand", "usb", "dvd", "jukebox", "auto"}
    for name, r in runs.items():
        assert r["resume_seconds"] > 0 and len(r["ops"]) == 4, name
        assert all(o["seconds"] > 0 for o in r["ops"]), name
        assert r["suspend"]["committed"], name
        # The residue both ways: trickle can only take chunks off what the suspend uploads.
        res_ = r["residue"]
        assert res_["without_trickle_chunks"] >= res_["with_trickle_chunks"] >= 0, (name, res_)
    assert len(res["reference"]["ops"]) == 4
    # Baseline moves the whole state before the guest runs, demand only what it
    # needs, and with the memory image on the key the server sends less still.
    assert runs["baseline"]["resume_pack_bytes"] > runs["demand"]["resume_pack_bytes"]
    assert runs["usb"]["resume_pack_bytes"] < runs["demand"]["resume_pack_bytes"] / 2
    # The jukebox (J, holding version 1) served chunks over the LAN, unshaped; no other run had a LAN peer.
    lan = {n: {x["name"]: x for x in r["sources"]}.get("lan") for n, r in runs.items()}
    assert lan["jukebox"] is not None and lan["jukebox"]["hits"] > 0 and lan["jukebox"]["bad"] == 0, lan
    assert all(v is None for n, v in lan.items() if n != "jukebox"), lan
    assert res["link"]["testbed"]["hosts"].keys() == {"server", "A", "B", "J"}
    # Proactive hoarded first, so its resume took nothing from the server.
    assert runs["proactive"]["hoard_pack_bytes"] > 0 and runs["proactive"]["resume_pack_bytes"] == 0
    assert res["link"]["netem"] in (True, False) and "100000000bit" in res["link"]["tbf"]["100mbit"]

    rows = {(x["policy"], x["rate"]): x for x in res["figures"]["rows"]}
    # This memory image over the full-size one's: the paper's figure beside it is scaled by the same factor.
    scale = res["state"]["memory_bytes"] / 10**9
    assert {x["scale"] for x in res["figures"]["rows"]} == {scale} and res["settings"]["memory_mib"] == 128
    assert rows[("demand", "100mbit")]["paper_resume"] == pytest.approx(14.0 * scale)
    assert rows[("usb", "100mbit")]["ratio_to_paper"] == pytest.approx(runs["usb"]["resume_seconds"] / (13.0 * scale))
    # Issue 15's figures up to the first answer, from the runtime's own counters.
    for name in ("demand", "auto"):
        a = runs[name]["at_answer"]
        assert a["fetched_bytes"] > 0 and 0 <= a["wasted_bytes"] < a["fetched_bytes"], (name, a)
        assert a["memory"]["requests"] is not None and a["disk_misses"] >= 0, (name, a)
    md = (out / "report.md").read_text()
    assert "## Resume latency" in md and "## Targets" in md and "jukebox lookaside | - | " in md
    assert "netem" in md and "n=1" in md and "Scaling: the state is scaled down" in md and f"x{scale:.3g}" in md
    assert "## Up to the guest's first answer" in md
    assert "without trickle / with trickle" in md and "| - / " not in md  # every run read both residues
    for png in ("resume-latency.png", "slowdown-cdf.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_debian_guest_boots_and_its_agent_times_the_workload(tmp_path: Path) -> None:
    from benchmarks.paper.guest import MEMORY_MIB, build_debian_guest
    from benchmarks.paper.workload import AgentDriver, Console
    from isrsync.demo.guest import QEMU_SYSTEM, qemu_accel, serial_args

    g = build_debian_guest()
    disk = tmp_path / "root.img"
    subprocess.run(["cp", "--sparse=always", str(g.image), str(disk)], check=True)
    ser = tmp_path / "ser"
    q = subprocess.Popen([QEMU_SYSTEM, "-M", "q35", "-accel", qemu_accel(), "-m", str(MEMORY_MIB), "-nodefaults",
                          "-display", "none", "-kernel", str(g.kernel), "-initrd", str(g.initrd), "-append", g.cmdline,
                          "-drive", f"file={disk},format=raw,if=none,id=d0", "-device", "virtio-blk-pci,drive=d0",
                          *serial_args(ser)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         start_new_session=True)
    try:
        drv = AgentDriver(Console(ser))
        try:
            drv.answer(300)
            seen = []
            run = drv.run(seed=3, n=5, think_ms=10, timeout=300, on_op=seen.append)
            drv.con.send("poweroff")
            drv.con.expect("AGENT: BYE", 60, skip="AGENT: PONG")
        finally:
            drv.con.close()
        assert q.wait(120) == 0
    finally:
        if q.poll() is None:
            os.killpg(q.pid, 9)
            q.wait()
        disk.unlink(missing_ok=True)
    assert run.timed_in == "guest" and [o.index for o in run.ops] == list(range(5)) and seen == run.ops
    assert all(o.seconds > 0 for o in run.ops)
    assert run.busy_seconds == pytest.approx(sum(o.seconds for o in run.ops), abs=0.01)
    assert run.wall_seconds >= run.busy_seconds
    shutil.rmtree(tmp_path, ignore_errors=True)
