"""site/view.py without a guest: which display `resume` opens, which addresses --listen
takes, how each viewer is told where the screen is, and the loopback proxy over a unix
socket (a stand-in VNC server that sends the RFB greeting)."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

import pytest

from isrsync.errors import UsageError
from isrsync.site import view
from isrsync.site.policy import Display
from isrsync.site.view import LoopbackProxy, Viewer, choose_display, find_viewer, parse_listen


def test_auto_is_a_window_only_with_a_display(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(view, "x_server_answers", lambda d: True)
    monkeypatch.setattr(view, "display_backends", lambda: frozenset({"none", "gtk", "sdl"}))
    assert choose_display(Display.AUTO, {}) == (Display.NONE, None)
    assert choose_display(Display.AUTO, {"DISPLAY": ""}) == (Display.NONE, None)
    assert choose_display(Display.AUTO, {"DISPLAY": ":0"}) == (Display.GTK, None)
    monkeypatch.setattr(view, "display_backends", lambda: frozenset({"none", "sdl"}))
    assert choose_display(Display.AUTO, {"DISPLAY": ":0"}) == (Display.SDL, None)
    monkeypatch.setattr(view, "display_backends", lambda: frozenset({"none"}))
    shown, why = choose_display(Display.AUTO, {"DISPLAY": ":0"})
    assert shown is Display.NONE and why is not None and "qemu-system-gui" in why and "\n" not in why
    # An explicit choice is the user's, display or not.
    assert choose_display(Display.GTK, {}) == (Display.GTK, None)
    assert choose_display(Display.NONE, {"DISPLAY": ":0"}) == (Display.NONE, None)


def test_a_display_whose_x_server_does_not_answer_gets_no_window(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stale $DISPLAY would make QEMU fail at start: auto opens no window and says why."""
    import socket

    monkeypatch.setattr(view, "display_backends", lambda: frozenset({"none", "gtk", "sdl"}))
    listening = tmp_path / "X7"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind(str(listening))
        srv.listen(1)
        assert choose_display(Display.AUTO, {"DISPLAY": f"{listening}:0"}) == (Display.GTK, None)
    finally:
        srv.close()
    shown, why = choose_display(Display.AUTO, {"DISPLAY": f"{tmp_path / 'gone'}:0"})
    assert shown is Display.NONE and why is not None and "does not answer" in why and "\n" not in why
    assert choose_display(Display.AUTO, {"DISPLAY": "not a display"})[0] is Display.NONE
    # A TCP display (host:N is port 6000 + N): answered while something listens, not after.
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    spec = f"127.0.0.1:{tcp.getsockname()[1] - 6000}"
    try:
        assert choose_display(Display.AUTO, {"DISPLAY": spec}) == (Display.GTK, None)
    finally:
        tcp.close()
    assert choose_display(Display.AUTO, {"DISPLAY": spec})[0] is Display.NONE


@pytest.mark.parametrize("spec, want", [("5901", ("127.0.0.1", 5901)), ("127.0.0.1:0", ("127.0.0.1", 0)),
                                        ("localhost:5900", ("localhost", 5900)), ("[::1]:5900", ("::1", 5900))])
def test_listen_takes_loopback(spec: str, want: tuple[str, int]) -> None:
    assert parse_listen(spec) == want


@pytest.mark.parametrize("spec", ["0.0.0.0:5900", "192.168.1.2:5900", "example.com:5900", "127.0.0.1:x",
                                  "127.0.0.1:70000"])
def test_listen_refuses_the_network_and_nonsense(spec: str) -> None:
    with pytest.raises(UsageError):
        parse_listen(spec)


def test_each_viewer_is_told_the_way_it_understands() -> None:
    sock = Path("/run/x/vnc.sock")
    assert Viewer("/usr/bin/xtigervncviewer", True).argv(sock, None) == ["/usr/bin/xtigervncviewer", str(sock)]
    assert Viewer("/usr/bin/remote-viewer", True).argv(sock, None) == ["/usr/bin/remote-viewer",
                                                                       "vnc+unix:///run/x/vnc.sock"]
    assert Viewer("/usr/bin/gvncviewer", False).argv(sock, ("127.0.0.1", 5905)) == ["/usr/bin/gvncviewer",
                                                                                   "127.0.0.1::5905"]


def test_find_viewer_prefers_one_that_takes_the_socket(tmp_path: Path) -> None:
    for name in ("vncviewer", "xtigervncviewer"):
        exe = tmp_path / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    found = find_viewer(str(tmp_path))
    assert found == Viewer(str(tmp_path / "xtigervncviewer"), True)
    (tmp_path / "xtigervncviewer").unlink()
    assert find_viewer(str(tmp_path)) == Viewer(str(tmp_path / "vncviewer"), False)
    assert find_viewer(str(tmp_path / "none")) is None


async def test_the_proxy_carries_both_ways_and_ends_with_the_server() -> None:
    d = Path(tempfile.mkdtemp(prefix="isr-view-", dir="/tmp"))
    sock = d / "vnc.sock"

    async def fake_vnc(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"RFB 003.008\n")
        writer.write(b"echo:" + await reader.readexactly(12))
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(fake_vnc, path=str(sock))
    proxy = LoopbackProxy(sock, "127.0.0.1", 0)
    try:
        host, port = await proxy.start()
        assert host == "127.0.0.1" and port > 0
        r, w = await asyncio.open_connection(host, port)
        assert await r.readexactly(12) == b"RFB 003.008\n"
        w.write(b"RFB 003.008\n")
        assert await r.readexactly(17) == b"echo:RFB 003.008\n"
        assert await asyncio.wait_for(r.read(), 10) == b""  # the server closed: so does the proxy
        w.close()
        # With no server behind it, a client is closed at once rather than left hanging.
        server.close()
        os.unlink(sock)
        r, w = await asyncio.open_connection(host, port)
        assert await asyncio.wait_for(r.read(), 10) == b""
        w.close()
    finally:
        await proxy.close()
        server.close()
        for p in d.iterdir():
            p.unlink()
        d.rmdir()
