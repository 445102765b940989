"""Crash safety of the site cache: a writer is SIGKILLed again and again, on one cache.

After every kill the cache must open, every indexed chunk must verify, every
chunk the writer saw committed must still be there, and no temporary may be
left once the cache has been reopened. The damage of each kill is left in place
for the next writer, so anything a crash leaves behind accumulates.
"""

from __future__ import annotations

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
from isrsync.site.cache import SiteCache

KILLS = 50

# Kept light: imports only the chunk codec, the cache and the pack writer.
WRITER = textwrap.dedent(
    """
    import hashlib, os, random, sys
    from isrsync.chunk import CHUNK_SIZE, encode
    from isrsync.pack import PackWriter
    import isrsync.site.cache as sc

    sc.SEGMENT_LIMIT = 2 << 20  # small segments: rollovers happen under fire too
    path, secret, seed = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
    rnd = random.Random(seed)
    out = sys.stdout

    def plain():
        r = rnd.random()
        if r < 0.2:  # a small shared pool: duplicates of chunks earlier writers stored
            k = rnd.randrange(48)
            base = hashlib.blake2b(k.to_bytes(4, "little"), digest_size=64).digest()
            return (base * 2048)[: 1 + (k * 2053) % CHUNK_SIZE]
        if r < 0.23:
            size = CHUNK_SIZE
        elif r < 0.3:
            size = rnd.randint(8192, CHUNK_SIZE)
        else:
            size = rnd.randint(1, 6000)
        if rnd.random() < 0.5:
            return os.urandom(size)
        return (os.urandom(64) * (size // 64 + 1))[:size]  # compressible

    def encoded():
        while True:
            e = encode(plain(), secret)
            if not e.ref.is_zero:
                return e

    c = sc.SiteCache(path)
    out.write("READY\\n")
    out.flush()
    mine = []
    n = 0
    while True:
        n += 1
        if rnd.random() < 0.1:
            tmp = os.path.join(path, f".incoming-{os.getpid()}-{n}.tmp")
            with open(tmp, "wb") as f:
                w = PackWriter(f)
                for _ in range(rnd.randint(1, 12)):
                    e = rnd.choice(mine) if mine and rnd.random() < 0.2 else encoded()
                    w.add(e.tag, e.data)
                info = w.finish()
            c.add_pack(tmp, info.pack_id)
            out.write("P " + " ".join(x.tag.hex() for x in info.entries) + "\\n")
            out.flush()
            continue
        batch = []
        for _ in range(rnd.randint(1, 20)):
            batch.append(rnd.choice(mine) if mine and rnd.random() < 0.15 else encoded())
        c.put_many([(e.tag, e.data) for e in batch])
        out.write("C " + " ".join(e.tag.hex() for e in batch) + "\\n")
        out.flush()
        mine = (mine + batch)[-200:]
    """
)


def _reported(stdout: bytes) -> tuple[bool, list[bytes], int]:
    """(READY seen, tags reported committed, pack lines) from complete lines only."""
    lines = stdout.split(b"\n")[:-1]  # the last piece is a partial line (or empty)
    ready = False
    tags: list[bytes] = []
    packs = 0
    for line in lines:
        if line == b"READY":
            ready = True
            continue
        kind, *hexes = line.split()
        assert kind in (b"C", b"P"), line[:80]
        packs += kind == b"P"
        tags += [bytes.fromhex(h.decode()) for h in hexes]
    return ready, tags, packs


def _wait_ready(out_path: Path, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while b"READY\n" not in out_path.read_bytes():
        if proc.poll() is not None:
            return  # died on its own: reported below
        assert time.monotonic() < deadline, "the writer never became ready"
        time.sleep(0.002)


@pytest.mark.slow
def test_sigkill_writer_repeatedly(tmp_path):
    cache_dir = tmp_path / "cache"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    secret = os.urandom(32).hex()
    rnd = random.Random(int.from_bytes(os.urandom(4), "little"))
    seed0 = rnd.randrange(1 << 30)
    committed: set[bytes] = set()
    phases = {"before-ready": 0, "ready-no-commit": 0, "after-commits": 0}
    pack_lines = 0
    ready_times: list[float] = []
    t0 = time.monotonic()
    for i in range(KILLS):
        out_path = tmp_path / f"out{i}"
        err_path = tmp_path / f"err{i}"
        # A quarter of the kills are timed from the start, aimed at start-up (imports,
        # open, first set-up); the rest from READY, landing among puts and packs.
        from_start = i % 4 == 0
        if from_start and ready_times:
            startup = sorted(ready_times)[len(ready_times) // 2]
            delay = rnd.uniform(0.02, max(0.03, min(0.4, startup * 1.1)))
        else:
            delay = rnd.uniform(0.02, 0.4)
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, str(script), str(cache_dir), secret, str(seed0 + i)],
                stdout=out,
                stderr=err,
            )
        spawned = time.monotonic()
        try:
            if not from_start:
                _wait_ready(out_path, proc)
                ready_times.append(time.monotonic() - spawned)
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -signal.SIGKILL, (
            f"seed {seed0} kill {i}: the writer exited by itself ({proc.returncode}):\n"
            + err_path.read_text()[-3000:]
        )
        ready, tags, packs = _reported(out_path.read_bytes())
        pack_lines += packs
        phases[
            "after-commits" if tags else "ready-no-commit" if ready else "before-ready"
        ] += 1
        new = set(tags) - committed
        committed |= set(tags)

        with SiteCache(cache_dir) as cache:
            assert cache.verify() == [], (
                f"seed {seed0} kill {i}: indexed chunks fail to verify"
            )
            present = set(cache.tags())
            lost = committed - present
            assert not lost, (
                f"seed {seed0} kill {i}: {len(lost)} committed chunks are gone"
            )
            for t in new:
                data = cache.get(t)
                assert data is not None and tag_of(data) == t, (
                    f"seed {seed0} kill {i}: chunk {t.hex()[:16]}"
                )
            temps = sorted(
                str(p.relative_to(cache_dir)) for p in cache_dir.rglob(".*.tmp")
            )
            assert temps == [], (
                f"seed {seed0} kill {i}: temporaries left after reopen: {temps}"
            )
            assert (cache_dir / "site.json").is_file() or not ready

    elapsed = time.monotonic() - t0
    # The kills must really have landed in different phases and exercised packs.
    assert phases["before-ready"] >= 3, phases
    assert phases["after-commits"] >= KILLS // 2, phases
    assert pack_lines >= 3, pack_lines
    assert len(committed) >= 500, len(committed)
    with SiteCache(cache_dir) as cache:
        st = cache.stats()
        assert st.chunks >= len(committed)
        assert st.segments >= 2  # rolled over at least once
        assert st.packs >= 1
    print(
        f"{KILLS} kills in {elapsed:.1f}s, phases {phases}, {len(committed)} chunks committed, "
        f"{st.segments} segments, {st.packs} packs, {st.disk_bytes >> 20} MiB"
    )
