"""What this site is called: a name its user chose, shown wherever a lock holder is named.

The site id (random, in ``site.json``) tells sites apart for the machines; the
name is for people, who could not tell ten lab machines all called "vm" apart
by a UUID prefix. It lives in the site cache beside the id (``site-name``,
one line of UTF-8) and defaults to the host name.
"""

from __future__ import annotations

import socket
import unicodedata
from pathlib import Path

from ..errors import UsageError
from ..fsutil import atomic_write

NAME_FILE = "site-name"
MAX_NAME = 64


def check_site_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise UsageError(f"a site name has 1 to {MAX_NAME} characters", hint="for example: `isrsync site name lab-3`")
    if any(unicodedata.category(c)[0] == "C" for c in name):
        raise UsageError("a site name cannot hold control characters (a newline, a tab, ...)")
    return name


def site_name(cache_dir: Path) -> str:
    """The chosen name, or the host name when none was chosen (or the file is unreadable)."""
    try:
        return check_site_name((cache_dir / NAME_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, UsageError):
        return socket.gethostname()


def set_site_name(cache_dir: Path, name: str) -> str:
    name = check_site_name(name)
    atomic_write(cache_dir / NAME_FILE, (name + "\n").encode("utf-8"))
    return name
