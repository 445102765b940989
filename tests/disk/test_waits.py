"""How waits for late chunks are told (issue 15, part 5): together, at most one line
per interval, slow apart from missing, and once more when the last one came."""

from __future__ import annotations

import time

from isrsync.errors import ChunkSlow, ChunkUnavailable
from isrsync.vm.waits import Waits


def test_hundreds_of_late_chunks_are_one_line_and_one_line_when_they_came() -> None:
    said: list[str] = []
    w = Waits(said.append, "chunk(s) of guest memory", first_after=0.0, every=3600.0)
    t0 = time.monotonic() - 12
    slow = ChunkSlow("chunk x did not come in time", details={"rate": 125_000})
    for i in range(220):
        w.failed(i, t0, slow)
    assert len(said) == 1, said
    assert said[0].startswith("1 chunk(s) of guest memory slow to arrive; the sources deliver about 122 KiB/s")
    assert "the guest waits" in said[0] and "no source has" not in said[0]
    for i in range(219):
        w.arrived(i)
    assert len(said) == 1  # one is still late
    w.arrived(219)
    assert len(said) == 2 and said[1].startswith("the chunk(s) of guest memory the guest waited for arrived")


def test_missing_is_told_apart_from_slow_and_repeats_only_after_the_interval() -> None:
    said: list[str] = []
    w = Waits(said.append, "disk chunk(s)", first_after=0.0, every=0.2)
    now = time.monotonic()
    w.failed(1, now, ChunkSlow("late", details={"rate": 0}))
    w.failed(2, now, ChunkUnavailable("no source has chunk 2"))
    assert len(said) == 1 and "slow to arrive" in said[0] and "KiB/s" not in said[0]
    w.failed(2, now, ChunkUnavailable("no source has chunk 2"))
    assert len(said) == 1
    time.sleep(0.25)
    w.failed(2, now, ChunkUnavailable("no source has chunk 2"))
    assert len(said) == 2
    assert "1 disk chunk(s) slow to arrive" in said[1] and "no source has 1 disk chunk(s) yet" in said[1], said


def test_nothing_is_said_before_the_first_threshold() -> None:
    said: list[str] = []
    w = Waits(said.append, "chunk(s) of guest memory", first_after=10.0)
    w.failed(1, time.monotonic(), ChunkSlow("late"))
    w.arrived(1)
    assert said == []
