"""What the guest writes is never on the site's disk in the clear (DESIGN.md, "Site")."""

from __future__ import annotations

import os
import random
from pathlib import Path

from diskkit import CH, kit

MARKER = b"ISRSYNC-AT-REST-MARKER-" + os.urandom(8).hex().encode() + b"-END"


def _windows(plain: bytes, w: int = 32) -> set[bytes]:
    return {plain[i : i + w] for i in range(len(plain) - w + 1)}


def _leaks(root: Path, windows: set[bytes]) -> list[str]:
    """Files under ``root`` holding the marker or any 64-byte window of the plaintext.

    A 64-byte window of the plaintext found anywhere in a file covers a 32-byte
    slice of the file that starts at a multiple of 32, and that slice is a
    32-byte window of the plaintext: so checking file offsets in steps of 32
    against all 32-byte windows finds every 64-byte leak.
    """
    bad = []
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        data = p.read_bytes()
        if MARKER in data:
            bad.append(f"{p.relative_to(root)}: marker")
            continue
        for o in range(0, len(data) - 31, 32):
            if data[o : o + 32] in windows:
                bad.append(f"{p.relative_to(root)}: plaintext at {o}")
                break
    return bad


async def test_written_plaintext_is_encrypted_at_rest(make_parcel, make_site, tmp_path: Path) -> None:
    parcel = await make_parcel(seed=21, size=12 * CH)
    site = await make_site(parcel, "cache")
    rng = random.Random(22)
    # incompressible plaintext with the marker sprinkled in, written straddling chunks
    body = bytearray(rng.randbytes(2 * CH + 5000))
    for k in range(0, len(body) - len(MARKER), 20_000):
        body[k : k + len(MARKER)] = MARKER
    plain = bytes(body)
    f = tmp_path / "plain.bin"
    f.write_bytes(plain)
    off = 3 * CH - 2500
    # and a very compressible one (the marker repeated) over a whole chunk and a bit
    rep = (MARKER * (CH // len(MARKER) + 2))[: CH + 300]
    g = tmp_path / "rep.bin"
    g.write_bytes(rep)
    (await kit.qemu_io(site.uri, f"write -q -s {f} {off} {len(plain)}", f"write -q -s {g} {8 * CH} {len(rep)}")).check()
    # not flushed yet: whatever sits in segments and WALs now must be ciphertext too
    windows = _windows(plain)
    files = {p.name for p in site.cache.path.rglob("*")}
    assert {"index.db-wal", "state.db-wal"} <= files, files
    assert any(p.stat().st_size for p in (site.cache.path / "segments").iterdir())
    assert _leaks(site.cache.path, windows) == []
    (await kit.qemu_io(site.uri, "flush")).check()
    assert _leaks(site.cache.path, windows) == []
    # the data is really there (readable through NBD), and the dirty chunks are cached
    res = (await kit.qemu_io(site.uri, f"read -v {off} {len(plain)}", f"read -v {8 * CH} {len(rep)}")).check()
    assert kit.parse_dumps(res.out, [(off, len(plain)), (8 * CH, len(rep))]) == [plain, rep]
    assert set(site.disk.dirty) == {2, 3, 4, 5, 8, 9}
    await site.close()
    assert _leaks(site.cache.path, windows) == []
    # the check itself finds a leak when there is one
    (site.cache.path / "leak").write_bytes(os.urandom(100) + plain[1000:1064] + os.urandom(50))
    assert [w.split(":")[0] for w in _leaks(site.cache.path, windows)] == ["leak"]
