"""A writer killed at any moment (mid-pack, mid-publish) leaves a medium that opens, whose
index is whole, and every chunk it lists reads back verified; `sneakernet index` then
finds the packs that were written but never listed."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from isrsync.chunk import tag_of
from sneakernet import format as fmt
from sneakernet.indexer import index_tree
from sneakernet.medium import format_medium, open_medium
from sneakernet.source import MediumSource

WRITER = textwrap.dedent("""
    import os, sys, uuid
    from pathlib import Path
    from isrsync.chunk import encode
    from sneakernet.medium import open_medium

    root, secret, n = Path(sys.argv[1]), os.urandom(32), 0
    while True:
        m = open_medium(root)
        with m.writer(pack_limit=192 << 10) as w:
            w.add_chunks((e.tag, e.data) for e in (encode(os.urandom(24_000), secret) for _ in range(24)))
            print("publishing", n, flush=True)
            w.publish()
        print("published", n, flush=True)
        n += 1
""")

ROUNDS = 16


def _wait_for(proc: subprocess.Popen, word: str, timeout: float = 30.0) -> None:
    assert proc.stdout is not None
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the writer exited: {proc.stderr.read() if proc.stderr else ''}")
        if line.startswith(word):
            return
    raise AssertionError(f"the writer never said {word!r}")


async def _verify_all(root: Path) -> int:
    m = open_medium(root)
    assert m.index_problem is None, f"the index is not whole: {m.index_problem}"
    tags = [e.tag for e in m.index.entries]
    src = MediumSource(root)
    try:
        got = await src.get_many(tags)
    finally:
        await src.close()
    assert set(got) == set(tags), "an indexed chunk is missing"
    bad = [t.hex()[:16] for t, d in got.items() if tag_of(d) != t]
    assert not bad, f"indexed chunks that do not verify: {bad}"
    return len(tags)


@pytest.mark.slow
def test_a_writer_killed_anywhere_leaves_a_valid_medium(tmp_path: Path) -> None:
    root = tmp_path / "key"
    root.mkdir()
    format_medium(root, "crash")
    rng = random.Random(int.from_bytes(os.urandom(4)))
    listed = 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                         os.environ.get("PYTHONPATH", "")])}
    for r in range(ROUNDS):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env)
        try:
            for _ in range(rng.randint(0, 2)):
                _wait_for(proc, "published")
            _wait_for(proc, "publishing")
            # Half the rounds die inside publish (a few ms), half anywhere later.
            time.sleep(rng.uniform(0, 0.004) if r % 2 == 0 else rng.uniform(0, 0.2))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            for f in (proc.stdout, proc.stderr):
                if f is not None:
                    f.close()
        n = asyncio.run(_verify_all(root))
        assert n >= listed, "a later index never lists less than an earlier one"
        listed = n
    temps = [p for p in (root / fmt.DIR).rglob("*.tmp")]
    report = index_tree(root)
    assert report.bad_entries == 0
    assert asyncio.run(_verify_all(root)) >= listed
    assert report.chunks >= listed and all(p.name.startswith(".") for p in temps)
