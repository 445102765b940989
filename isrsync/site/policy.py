"""The transfer policies (paper section 6) and the memory-restore modes, as values
that say what they do, so the runtime asks a policy rather than testing strings."""

from __future__ import annotations

import enum


class Policy(str, enum.Enum):
    """How a resume gets the parcel's state."""

    AUTO = "auto"  # demand fetch + lookaside + trace prefetch + low-priority background hoard
    DEMAND = "demand"  # pure demand fetch, from the home server only
    LOOKASIDE = "lookaside"  # demand fetch, lookaside sources before the server
    PROACTIVE = "proactive"  # run from a hoarded cache
    BASELINE = "baseline"  # fetch everything, then run

    @property
    def uses_lookaside(self) -> bool:
        return self in (Policy.LOOKASIDE, Policy.AUTO)

    @property
    def fetches_everything_first(self) -> bool:
        return self in (Policy.BASELINE, Policy.PROACTIVE)

    @property
    def prefetches(self) -> bool:
        """Trace-order prefetch, then the background hoard, while the guest runs."""
        return self is Policy.AUTO


class MemoryMode(str, enum.Enum):
    """lazy: the guest runs once its device state is in, RAM follows (post-copy);
    eager: all of RAM is in before the guest runs. Lazy falls back to eager
    where the host cannot trap the guest's faults."""

    LAZY = "lazy"
    EAGER = "eager"


class Display(str, enum.Enum):
    """How the guest's screen is shown by `resume`; auto is a window when there is a
    display to open one on (site/view.py, choose_display), none otherwise."""

    AUTO = "auto"
    NONE = "none"
    GTK = "gtk"
    SDL = "sdl"
    VNC = "vnc"
