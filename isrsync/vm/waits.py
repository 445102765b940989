"""What a guest waits for, told in few lines.

On a slow link hundreds of chunks can be late at once; a line per chunk buries the
one thing the user needs to know. So the waits are told together, at most one line
per interval: how many, whether they are slow (a source is still answering) or
missing (no source has them), and, once the last one came, that the wait is over.
"""

from __future__ import annotations

import time
from typing import Callable, Hashable

from ..errors import ChunkSlow, IsrError

Say = Callable[[str], None]


class Waits:
    def __init__(self, say: Say, what: str, *, first_after: float = 10.0, every: float = 30.0) -> None:
        self.say = say
        self.what = what  # e.g. "chunk(s) of guest memory"
        self.first_after = first_after
        self.every = every
        self._waiting: dict[Hashable, tuple[float, IsrError]] = {}
        self._last_said = float("-inf")
        self._said = False
        self._longest = 0.0

    def failed(self, key: Hashable, since: float, err: IsrError) -> None:
        """A try for ``key`` (waited for since ``since``, monotonic) failed with ``err``."""
        self._waiting[key] = (since, err)
        now = time.monotonic()
        if now - since < self.first_after or now - self._last_said < self.every:
            return
        self._last_said = now
        self._said = True
        waits = list(self._waiting.values())
        longest = max(now - t for t, _ in waits)
        slow = [e for _, e in waits if isinstance(e, ChunkSlow)]
        missing = len(waits) - len(slow)
        parts = []
        if slow:
            rates = [int(e.details.get("rate") or 0) for e in slow]
            rate = f"; the sources deliver about {max(rates) / 1024:.0f} KiB/s" if max(rates) else ""
            parts.append(f"{len(slow)} {self.what} slow to arrive{rate}")
        if missing:
            parts.append(f"no source has {missing} {self.what} yet (reconnect to the home server or plug in "
                         "a medium that holds the parcel)")
        self.say(f"{' and '.join(parts)}; the guest waits for them (the longest for {longest:.0f} s)")

    def arrived(self, key: Hashable) -> None:
        got = self._waiting.pop(key, None)
        if got is not None:
            self._longest = max(self._longest, time.monotonic() - got[0])
        if self._said and not self._waiting:
            self._said = False
            self.say(f"the {self.what} the guest waited for arrived (the longest after {self._longest:.0f} s)")
            self._longest = 0.0
