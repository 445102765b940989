"""`isrsync console`: the guest's serial console shared by several clients at once (issue
"What the user sees and can recover", part 6). Before, QEMU's socket took one client and a
second one was accepted and heard nothing. Fixtures are in tests/vm/conftest.py."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time

from sitekit import SerialConsole, isrsync_argv


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:
                break
    return seen


def test_two_consoles_and_the_serial_socket_all_see_the_guest(sites, parcel) -> None:
    a, name = parcel
    proc, _, con = a.resume(name)  # con: the --serial socket, one client already
    con.wait_for("GUEST: READY", 120)

    second = SerialConsole(a.runtime / "ser.sock")  # a second client of the same socket
    master, slave = pty.openpty()
    cli = subprocess.Popen([*isrsync_argv(), "console", name], env=a.env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    a.procs.append(cli)
    try:
        assert b"Ctrl-] detaches" in _read_until(master, b"detaches", 30)
        # Typed at the terminal (raw mode: the newline is a carriage return), answered to everyone.
        os.write(master, b"echo from-the-terminal\r")
        assert b"GUEST: ECHO from-the-terminal" in _read_until(master, b"GUEST: ECHO from-the-terminal", 30)
        assert second.wait_for("GUEST: ECHO from-the-terminal", 30)
        assert con.wait_for("GUEST: ECHO from-the-terminal", 30)
        # And the other way round: the socket's command reaches the guest, the terminal sees the answer.
        assert second.command("echo from-the-socket") == "GUEST: ECHO from-the-socket"
        assert b"GUEST: ECHO from-the-socket" in _read_until(master, b"GUEST: ECHO from-the-socket", 30)
        os.write(master, b"\x1d")  # Ctrl-] detaches; the guest runs on
        assert cli.wait(30) == 0
    finally:
        os.close(master)
        second.close()
    assert con.command("echo still-here") == "GUEST: ECHO still-here"
    con.close()
    assert a.json("suspend", name)["committed"] is True
    a.ended(proc)
