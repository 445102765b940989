"""What a home server's JSON access log (its stderr) says it served: shared by the
tests that start `isrsync serve` themselves (tests/conftest.py's LiveServer, the
LAN tests' server in a namespace)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path


def records(log: Path) -> Iterator[dict]:
    for line in log.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield rec


def pack_bytes_sent(log: Path) -> int:
    """Bytes of pack data the server has sent (GETs of packs)."""
    return sum(int(r.get("bytes") or 0) for r in records(log)
               if r.get("method") == "GET" and "/packs/" in str(r.get("path")) and r.get("status") in (200, 206))


def requests(log: Path, method: str, path_part: str) -> int:
    """How many requests of ``method`` to a path containing ``path_part`` the log holds."""
    return sum(1 for r in records(log) if r.get("method") == method and path_part in str(r.get("path")))
