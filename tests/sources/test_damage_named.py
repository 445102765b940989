"""Issue 14, defect 6: when the home server answers with damaged bytes and nobody
has a good copy, the error says so (chunk, pack, `isrsync server check`), not
"no source has chunk …; reconnect", which reads like a network problem; the
registry counts those chunks for `isrsync status`.

Every Source backend is run: only the server's damage is blamed on the server.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from sourcekit import make_chunks

from isrsync.chunk import CHUNK_SIZE
from isrsync.errors import ChunkUnavailable, DamagedChunk
from isrsync.site.results import RunStatus
from isrsync.site.registry import SourceRegistry


@pytest.mark.needs("damage")
async def test_damaged_answers_are_named_where_they_are(backend, make_source, registry: SourceRegistry) -> None:
    chunks = make_chunks(6, size=CHUNK_SIZE if backend.full_chunks else None)
    held = await make_source(chunks)
    tag, good = list(chunks)[:2]
    await held.damage(tag)
    registry.add(held.source)

    with pytest.raises(ChunkUnavailable) as caught:
        await registry.fetch_many([tag, good])
    e = caught.value
    if not backend.name.startswith("server"):
        # A damaged medium or cache directory is only one source that failed to help.
        assert not isinstance(e, DamagedChunk), e
        assert registry.server_damaged == {}
        return
    pack = next(p.pack_id for p in held.packs if any(x.tag == tag for x in p.entries))
    assert isinstance(e, DamagedChunk), f"{type(e).__name__}: {e}"
    msg = str(e)
    assert f"the home server answered with damaged data for chunk {tag.hex()[:16]} of pack {pack.hex()[:16]}" in msg
    assert "isrsync server check" in msg and "no source has" not in msg and "reconnect" not in msg, msg
    assert e.exit_code == 8  # a ChunkUnavailable: callers that wait for chunks wait for it too
    assert e.details == {"chunk": tag.hex(), "pack": pack.hex()}
    assert registry.server_damaged == {tag: pack}
    # The good chunk of the same request still came (and a second try names the same damage).
    assert await registry.fetch_many([good]) == {good: chunks[good]}
    with pytest.raises(DamagedChunk):
        await registry.fetch(tag)
    assert registry.stats()[held.source.name].bad == 2

    if backend.name == "server-http":
        # What the hint promises: `isrsync server check` on the server finds it.
        data = held.home.data
        r = subprocess.run([sys.executable, "-m", "isrsync.cli.main", "server", "check", "--data", str(data),
                            "--json"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 3, r.stderr
        problems = json.loads(r.stdout)["problems"]
        assert any(pack.hex()[:16] in p for p in problems), problems


def test_status_carries_the_count_both_ways() -> None:
    d = {"parcel": "p", "name": None, "base": 1, "policy": "auto", "dirty_chunks": 0, "trickled_chunks": 0,
         "residue_chunks": 0, "reads": 0, "writes": 0, "misses": 0, "cache_hits": 0, "qemu": "running",
         "damaged_from_server": 2, "damaged_packs": ["ab" * 32]}
    st = RunStatus.from_json(d)
    assert (st.damaged_from_server, st.damaged_packs) == (2, ["ab" * 32])
    assert RunStatus.from_json(st.to_json()) == st
    # A status from a run that predates the field still reads.
    old = {k: v for k, v in d.items() if not k.startswith("damaged")}
    assert RunStatus.from_json(old).damaged_from_server == 0
