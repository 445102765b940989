"""BitTorrent v2 torrents of packs (DESIGN.md, "Packs and swarming").

A pack's torrent is a pure function of the pack's bytes and :data:`PIECE_SIZE`:
v2 only, one file named by the pack id, no creation date, no creator, no
trackers and no web seeds inside (the web seed is added per session with the
user's credentials, see :mod:`.session`). So every site that makes the torrent
of one pack gets the same bytes and the same info-hash, and they all meet in one
swarm whoever made it first.

The torrent covers ciphertext only (a pack): libtorrent's SHA-256 merkle tree
proves a piece came from the pack, and chunk tags are checked again above it.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import libtorrent as lt

from ..errors import FormatError, IntegrityError
from ..fsutil import os_error

# Chosen by measurement (benchmarks/torrent_pieces.py, docs/notes/NOTES-torrent.md): a demand
# miss of one 128 KiB chunk fetches about chunk + one piece, so small pieces keep a
# miss cheap; 16 KiB is also libtorrent's block size and v2's leaf size.
PIECE_SIZE = 16 << 10
# Torrents larger than this are refused by readers (a 4 GiB pack at 16 KiB
# pieces has an 8 MiB piece layer).
MAX_TORRENT = 16 << 20


@dataclass(frozen=True)
class PackTorrent:
    """A pack's torrent: its bencoded bytes and what a session needs from them."""

    pack_id: bytes
    data: bytes
    info_hash: bytes  # v2 info-hash (SHA-256 of the info dict), 32 bytes
    piece_size: int
    size: int  # the pack's length in bytes

    def torrent_info(self) -> lt.torrent_info:
        """A fresh libtorrent torrent_info (each session add wants its own)."""
        return lt.torrent_info(lt.bdecode(self.data))

    def pieces_of(self, offset: int, length: int) -> range:
        """The pieces that hold bytes ``offset .. offset + length`` of the pack."""
        if length <= 0 or offset < 0 or offset + length > self.size:
            raise FormatError(f"range {offset}+{length} is outside the pack of {self.size} bytes")
        return range(offset // self.piece_size, (offset + length - 1) // self.piece_size + 1)


def make_torrent_sync(path: Path, pack_id: bytes, piece_size: int = PIECE_SIZE) -> PackTorrent:
    """Worker thread: the torrent of the pack file at ``path`` (named ``pack_id``'s hex).

    libtorrent hashes the file; with a progress callback its binding gives the
    GIL back between pieces, so the loop and other threads keep running.
    """
    path = Path(path)
    if path.name != pack_id.hex():
        # The torrent names its one file; the file must carry that name on disk.
        raise FormatError(f"{path} is not named by its pack id {pack_id.hex()[:16]}")
    try:
        files = lt.list_files(str(path))
        ct = lt.create_torrent(files, piece_size, lt.create_torrent.v2_only)
        lt.set_piece_hashes(ct, str(path.parent), _ignore_progress)
    except RuntimeError as e:
        raise os_error(OSError(str(e)), f"pack {pack_id.hex()[:16]}") from e
    tree = ct.generate()
    tree.pop(b"creation date", None)  # the same pack must give the same bytes everywhere
    tree.pop(b"created by", None)
    return load_torrent(pack_id, lt.bencode(tree), size=os.stat(path).st_size)


def _ignore_progress(piece: int) -> None:
    # The callback exists for its side effect: the binding releases the GIL around
    # each piece only when given one (DESIGN.md, "Sharp edges").
    pass


async def make_torrent(path: Path, pack_id: bytes, piece_size: int = PIECE_SIZE) -> PackTorrent:
    """The torrent of a pack file, hashed on a worker thread."""
    return await asyncio.to_thread(make_torrent_sync, path, pack_id, piece_size)


def load_torrent(pack_id: bytes, data: bytes, size: int | None = None) -> PackTorrent:
    """Check that ``data`` is a v2 torrent of exactly the pack ``pack_id`` and wrap it.

    What it cannot check without the pack is whether its hashes are the pack's:
    a wrong torrent only makes libtorrent fail pieces, and tags are checked above it.
    """
    if not data or len(data) > MAX_TORRENT:
        raise FormatError(f"a torrent of {len(data)} bytes is out of range")
    try:
        tree = lt.bdecode(data)
        ti = lt.torrent_info(tree) if isinstance(tree, dict) else None
    except RuntimeError:
        ti = None
    if ti is None:
        raise FormatError(f"the torrent of pack {pack_id.hex()[:16]} is not a valid torrent")
    hashes = ti.info_hashes()
    fs = ti.layout()
    # libtorrent pads a v2 file to a piece boundary with a synthetic pad file.
    real = [i for i in range(fs.num_files()) if not fs.file_flags(i) & lt.file_storage.flag_pad_file]
    if not hashes.has_v2() or hashes.has_v1() or real != [0]:
        raise FormatError(f"the torrent of pack {pack_id.hex()[:16]} is not a single-file v2 torrent")
    if fs.file_path(0) != pack_id.hex():
        raise IntegrityError(f"the torrent names {fs.file_path(0)[:80]!r}, not pack {pack_id.hex()[:16]}")
    if size is not None and fs.file_size(0) != size:
        raise IntegrityError(f"the torrent says {fs.file_size(0)} bytes, the pack has {size}")
    return PackTorrent(pack_id, bytes(data), hashes.v2.to_bytes(), ti.piece_length(), fs.file_size(0))
