"""The README's main job: `isrsync demo` runs the whole cycle and says so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_moves_memory_and_disk_between_sites(guest, tmp_path: Path) -> None:
    exe = Path(sys.executable).parent / "isrsync"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "isrsync.cli.main"]
    r = subprocess.run(
        [*cmd, "demo", "--json", "--workdir", str(tmp_path / "w"), "--guest-cache", str(guest.kernel.parent)],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(r.stdout)
    assert rep["memory_moved"] and rep["disk_moved"]
    assert 0 < rep["counter_a"] <= rep["counter_b"]
    assert "in use on" in rep["refused"]
    steps = dict(rep["timings"])
    assert any("site B: isrsync resume" in k for k in steps)
    assert rep["resume_b"]["memory_image"] > 0
