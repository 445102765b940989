"""Issue 13, part 1: the memory restore tells its progress. Without a terminal (a
log, a pipe) a resume says in plain lines how an eager restore goes, and when the
last of a lazily restored guest's memory is in. A real guest and server."""

from __future__ import annotations

import re
import subprocess
import time

import pytest
from sitekit import isrsync_argv


def _resume_plain(site, name: str, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    """`isrsync resume` with stdout and stderr piped (no terminal, no --json), until it runs."""
    p = subprocess.Popen([*isrsync_argv(), "resume", name, "--serial", str(site.runtime / "ser.sock"), *extra],
                         env=site.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    site.procs.append(p)
    lines: list[str] = []
    deadline = time.monotonic() + 180
    assert p.stdout is not None
    while time.monotonic() < deadline:
        line = p.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("running;"):
            break
    return p, lines


def _rest(p: subprocess.Popen, lines: list[str]) -> list[str]:
    out, _ = p.communicate(timeout=120)
    return lines + out.splitlines()


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_the_memory_restore_tells_its_progress_without_a_terminal(sites, parcel, mode: str) -> None:
    a, name = parcel
    a.boot_and_suspend(name, "write note before-the-move")  # version 2 has a memory image
    b = sites("b")
    p, lines = _resume_plain(b, name, "--memory", mode)
    assert lines and lines[-1].startswith("running;"), lines
    time.sleep(3)  # a lazy restore of 256 MiB over loopback is in well within this
    assert b.json("suspend", name)["committed"] is True
    text = _rest(p, lines)
    assert not any("\x1b[" in ln for ln in text), "no terminal: no escape sequences"
    assert not any("Traceback" in ln for ln in text), text
    if mode == "eager":
        restore = [ln for ln in text if ln.startswith("restoring guest memory: ")]
        assert restore and re.fullmatch(r"restoring guest memory: [\d.]+ MiB of [\d.]+ MiB \(100%\), done",
                                        restore[-1]), text
        assert "all of the guest's memory is in" not in text
    else:
        # Said once, after the resume's own lines, whether or not a bar was still needed.
        assert text.count("all of the guest's memory is in") == 1, text
        assert text.index("all of the guest's memory is in") > text.index(lines[-1]), text
