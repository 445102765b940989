"""The guest's screen: its graphics card, a window on the user's display, and a VNC server.

Kept apart from :mod:`isrsync.vm.qemu` so that what the user sees can change
without touching how QEMU is run.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from ..errors import QemuError

VNC_SOCK = "vnc.sock"  # in the run directory (0700): only the user reaches the guest's screen


def screen_args(display: str, vnc_sock: Path) -> list[str]:
    """The guest's graphics card, a window (``display``: none, vnc, gtk or sdl), and a VNC server.

    The card is the same whatever the display, so a guest suspended with no
    window resumes in one and back: the device set is part of the saved state,
    and with ``-vga std`` against ``-vga none`` the virtio disk moves to another
    PCI slot and the restore fails. It sits at a slot of its own (after the
    disk's 00:01.0), where parcels suspended by the headless runs of before
    (``-vga none``) find their disk where they left it; such a guest sees the card
    only after its next boot. A VNC server always listens on a unix socket in
    the private run directory (`isrsync view`): no TCP port, no one else; with
    no client it only wakes to notice there is none.
    """
    # Closing the window must not pull the guest's plug (QEMU quits by default, and the
    # unsaved run is lost): the guest ends by `isrsync suspend` or Ctrl-C, as without one.
    window = f"{display},window-close=off" if display in ("gtk", "sdl") else "none"  # "vnc": no window
    return ["-vga", "none", "-device", f"VGA,id=screen,addr={_SCREEN_SLOT}",
            "-display", window, "-vnc", f"unix:{vnc_sock}"]


_SCREEN_SLOT = "0x10"


@functools.cache
def display_backends() -> frozenset[str]:
    """The -display back-ends this QEMU can load (gtk and sdl come as modules, in Debian's
    qemu-system-gui); asked once per process: it costs a QEMU start (~50 ms)."""
    try:
        r = subprocess.run([_qemu(), "-display", "help"], capture_output=True, text=True, timeout=30,
                           check=False, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired, QemuError):
        return frozenset()
    # After a header line, one back-end a line; a missing module is said on stderr.
    return frozenset(line.strip() for line in r.stdout.splitlines()[1:] if line.strip())


def _qemu() -> str:
    from .qemu import qemu_binary  # qemu imports this module: resolved at call time

    return qemu_binary()
