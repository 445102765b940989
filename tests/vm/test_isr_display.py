"""The guest's screen (issue 13, part 6): `resume` opens a window when $DISPLAY is set,
and `isrsync view` shows the screen of a run started without one. A real X server
(Xvfb), a real QEMU window and a real VNC viewer (TigerVNC); the screen itself is
read with QMP's screendump (`isrsync view --screenshot`). Fixtures are in
tests/vm/conftest.py; Xvfb, xwininfo and the viewer come from scripts/setup."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sitekit import SiteEnv, isrsync_argv


@pytest.fixture
def xvfb() -> Iterator[str]:
    """A virtual X server on a free display number (Xvfb picks it: -displayfd); its $DISPLAY."""
    r, w = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                            pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], 30)
        assert ready, "Xvfb did not start"
        number = os.read(r, 64).decode().strip()
        assert number.isdigit(), number
        yield f":{number}"
    finally:
        os.close(r)
        proc.terminate()
        proc.wait(10)


def _windows(display: str) -> str:
    """Every window of the X server, one a line, with its name (xwininfo from x11-utils)."""
    for _ in range(20):
        r = subprocess.run(["xwininfo", "-root", "-tree"], env={**os.environ, "DISPLAY": display},
                           capture_output=True, text=True, timeout=30, check=False)
        if r.returncode == 0:
            return r.stdout
        time.sleep(0.1)  # BadWindow: a window went while xwininfo walked the tree; walk it again
    raise AssertionError(f"xwininfo failed: {r.stderr}")


def _wait_window(display: str, needle: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in _windows(display).splitlines():
            if needle in line:
                return line
        time.sleep(0.5)
    raise AssertionError(f"no window {needle!r} on {display}: {_windows(display)}")


def _wait_gone(display: str, needle: str, timeout: float = 30) -> None:
    # The X server drops a client's windows when it notices the connection closed: soon, not at once.
    deadline = time.monotonic() + timeout
    while needle in _windows(display) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert needle not in _windows(display), _windows(display)


def _qemu_argv(site: SiteEnv) -> list[str]:
    (pid,) = site.qemu_pids()
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _png_pixels(path: Path) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct colours of an 8-bit RGB PNG (what QEMU's screendump writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, hdr = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            hdr = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", hdr)
    assert (depth, colour, interlace) == (8, 2, 0), (depth, colour, interlace)
    raw, bpp, stride = zlib.decompress(idat), 3, width * 3
    prev = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):  # undo the PNG filter of this line
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 0xFF
            elif f == 2:
                line[i] = (line[i] + b) & 0xFF
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        colours.update(bytes(line[i:i + 3]) for i in range(0, stride, 3))
        prev = line
    return width, height, colours


def _screenshot_has_text(site: SiteEnv, name: str, tmp_path: Path) -> None:
    png = tmp_path / "screen.png"
    site.run("view", name, "--screenshot", str(png))
    width, height, colours = _png_pixels(png)
    # The guest's text console (SeaBIOS, then Linux's on VGA): 720x400, letters on a background.
    assert width >= 640 and height >= 400, (width, height)
    assert len(colours) >= 2, f"the guest's screen is one colour: {colours}"


def _rfb_greeting(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    greeting = b""
    while not greeting.endswith(b"\n"):
        chunk = sock.recv(12 - len(greeting))
        assert chunk, f"closed after {greeting!r}"
        greeting += chunk
    return greeting


def test_resume_opens_a_window_when_display_is_set(sites, parcel, xvfb: str, tmp_path: Path) -> None:
    a, name = parcel
    a.env["DISPLAY"] = xvfb
    proc, _, con = a.resume(name)  # no --display: auto
    con.wait_for("GUEST: READY", 120)
    argv = _qemu_argv(a)
    # A window whose close button does not power the guest off.
    assert argv[argv.index("-display") + 1] == "gtk,window-close=off", argv
    assert any(x.startswith("unix:") and x.endswith("/vnc.sock") for x in argv), argv  # a VNC socket as well
    _wait_window(xvfb, '"QEMU (isrsync)')  # GTK's window, titled after -name
    _screenshot_has_text(a, name, tmp_path)
    con.close()
    assert a.json("suspend", name)["committed"] is True
    a.ended(proc)
    _wait_gone(xvfb, "QEMU (isrsync)")  # the window went with the run


def test_view_shows_the_screen_of_a_run_without_one(sites, parcel, xvfb: str, tmp_path: Path) -> None:
    a, name = parcel
    a.env.pop("DISPLAY", None)
    proc, _, con = a.resume(name)  # no $DISPLAY: no window
    con.wait_for("GUEST: READY", 120)
    argv = _qemu_argv(a)
    assert argv[argv.index("-display") + 1] == "none", argv
    assert argv[argv.index("-vnc") + 1] == f"unix:{a.runtime}/run-{a.site_id[:8]}-{a.parcel_id(name)[:8]}/vnc.sock"

    # --json: where the screen is. Its socket talks RFB and is the user's alone.
    where = a.json("view", name)
    sock_path = Path(where["socket"])
    assert where["protocol"] == "vnc" and where["uri"] == f"vnc+unix://{sock_path}"
    assert oct(sock_path.parent.stat().st_mode & 0o777) == "0o700"
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        assert _rfb_greeting(s).startswith(b"RFB 003.00")
    _screenshot_has_text(a, name, tmp_path)

    # No $DISPLAY (stdin a terminal, stdout a pipe): one plain line, the address; why on stderr; status 0.
    master, slave = pty.openpty()
    r = subprocess.run([*isrsync_argv(), "view", name], env=a.env, stdin=slave, capture_output=True,
                       text=True, timeout=60, check=False)
    os.close(slave)
    os.close(master)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"vnc unix socket: {sock_path}\n"
    assert "no $DISPLAY" in r.stderr and "Traceback" not in r.stderr

    # --listen: the socket on a loopback TCP port, for as long as the command runs.
    listen = subprocess.Popen([*isrsync_argv(), "view", name, "--listen", "127.0.0.1:0", "--json"], env=a.env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a.procs.append(listen)
    try:
        served = json.loads(listen.stdout.readline())
        assert served["host"] == "127.0.0.1" and served["port"] > 0
        with socket.create_connection((served["host"], served["port"]), timeout=30) as s:
            assert _rfb_greeting(s).startswith(b"RFB 003.00")
    finally:
        listen.terminate()
        listen.wait(30)

    # With a display and a viewer: TigerVNC, on the unix socket, shows the screen in a window.
    viewer = subprocess.Popen([*isrsync_argv(), "view", name], env={**a.env, "DISPLAY": xvfb},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    a.procs.append(viewer)
    try:
        _wait_window(xvfb, "QEMU (isrsync) - TigerVNC")  # named by the server: it connected
    finally:
        viewer.terminate()
        viewer.wait(30)
    _wait_gone(xvfb, "TigerVNC")  # the viewer went with `isrsync view`

    con.close()
    assert a.json("suspend", name)["committed"] is True
    a.ended(proc)
    r = a.run("view", name, check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "not running" in r.stderr, r.stderr


def test_a_guest_suspended_without_a_window_resumes_in_one(sites, parcel, xvfb: str) -> None:
    """The graphics card is the same with or without a window: the saved devices match."""
    a, name = parcel
    a.env.pop("DISPLAY", None)
    a.boot_and_suspend(name, "write note headless")
    a.env["DISPLAY"] = xvfb
    proc, _, con = a.resume(name)
    assert con.command("read note") == "GUEST: DATA headless"
    _wait_window(xvfb, '"QEMU (isrsync)')
    con.close()
    assert a.json("suspend", name)["committed"] is True
    a.ended(proc)


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("Xvfb", "xwininfo", "xtigervncviewer"):
        assert shutil.which(tool), f"{tool} is missing: run scripts/setup"
