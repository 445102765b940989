"""Joining the LAN swarm without depending on it: the one entry point resume and hoard use.

libtorrent and zeroconf are imported only here, only when the swarm is on
(``ISRSYNC_SWARM``, the global ``--no-swarm``), and a site where either is
missing or broken says so in one line and goes on without the swarm.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .lanswarm import LanSwarm

#: Environment switch: ``off`` (or 0/no/false) keeps a site out of the LAN swarm.
ENV_SWARM = "ISRSYNC_SWARM"


def enabled() -> bool:
    return os.environ.get(ENV_SWARM, "on").strip().lower() not in ("off", "0", "no", "false")


async def join(cache_dir: Path, site_id: uuid.UUID, store: Any, parcels: Sequence[uuid.UUID],
               warn: Callable[[str], None], **kw: Any) -> LanSwarm | None:
    """A started LanSwarm, or None (off by setting, or it cannot start: one warning line)."""
    if not enabled():
        return None
    try:
        from .lanswarm import start_or_none
    except ImportError as e:  # libtorrent or zeroconf missing or broken on this host
        warn(f"the LAN swarm is off ({e}); fetching from the home server alone")
        return None
    return await start_or_none(cache_dir, site_id, store, parcels, warn, **kw)
