"""Helpers for tests/media: real encoded chunks, real manifests, and ways to break a medium.

tests/ is rootless, so this module is imported by its unique name (like tests/disk/diskkit.py).
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from isrsync import manifest
from isrsync.chunk import CHUNK_SIZE, ChunkRef, encode
from isrsync.keys import new_convergence_secret, new_master_key
from isrsync.manifest import Keyring
from isrsync.site.sources import SourceKind
from isrsync.vmspec import VmSpec
from sneakernet import format as fmt
from sneakernet.medium import publish_index


def make_chunks(n: int, *, size: int | None = None, secret: bytes | None = None) -> dict[bytes, bytes]:
    """``n`` encoded chunks of random plaintext (tag -> ciphertext); random lengths unless ``size``."""
    secret = secret or new_convergence_secret()
    out: dict[bytes, bytes] = {}
    while len(out) < n:
        length = size or int.from_bytes(os.urandom(3)) % CHUNK_SIZE + 1
        e = encode(os.urandom(length), secret)
        if e.data:
            out[e.tag] = e.data
    return out


def make_manifest(parcel: uuid.UUID, version: int, tags: Sequence[bytes] = ()) -> bytes:
    """A real encrypted manifest of ``parcel`` (keys thrown away: media never need them)."""
    refs = [ChunkRef(t, bytes(32), 0) for t in tags] or [ChunkRef(os.urandom(32), bytes(32), 0)]
    parent = None
    if version > 1:
        # A chain needs the parent's decoded manifest; a fresh full keyring per version will do.
        key = new_master_key()
        raw = manifest.encode(parcel=parcel, version=1, master_key=key, vm=VmSpec(memory_mib=64),
                              keyring=Keyring.from_refs(len(refs) * CHUNK_SIZE, refs))
        parent = manifest.decode(raw, key)
        for v in range(2, version):
            raw = manifest.encode(parcel=parcel, version=v, master_key=key, vm=VmSpec(memory_mib=64),
                                  keyring=parent.keyring, parent=parent, full_every=1)
            parent = manifest.decode(raw, key)
        return manifest.encode(parcel=parcel, version=version, master_key=key, vm=VmSpec(memory_mib=64),
                               keyring=parent.keyring, parent=parent, full_every=1)
    return manifest.encode(parcel=parcel, version=1, master_key=new_master_key(), vm=VmSpec(memory_mib=64),
                           keyring=Keyring.from_refs(len(refs) * CHUNK_SIZE, refs))


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def read_index(root: Path, index_dir: Path | None = None) -> fmt.Index:
    return fmt.decode_index(((index_dir or root / fmt.DIR) / fmt.INDEX_FILE).read_bytes())


def where(root: Path, tag: bytes, index_dir: Path | None = None) -> tuple[Path, int, int]:
    idx = read_index(root, index_dir)
    e = idx.find(tag)
    assert e is not None, f"{tag.hex()[:16]} is not indexed"
    return root / idx.file_of(e).path, e.offset, e.length


def rewrite_index(root: Path, index: fmt.Index, index_dir: Path | None = None) -> None:
    publish_index(root, (index_dir or root / fmt.DIR) / fmt.INDEX_FILE, index)


class DictSource:
    """An honest source holding ciphertexts in memory, asked last (high cost)."""

    kind = SourceKind.OTHER

    def __init__(self, chunks: dict[bytes, bytes], name: str = "fallback", cost: float = 1000.0) -> None:
        self.name = name
        self.chunks = dict(chunks)
        self._cost = cost
        self.asked: Counter[bytes] = Counter()

    def cost(self) -> float:
        return self._cost

    async def get_many(self, tags: Sequence[bytes]) -> dict[bytes, bytes]:
        self.asked.update(tags)
        return {t: self.chunks[t] for t in tags if t in self.chunks}

    async def close(self) -> None:
        pass
