"""Chunk encoding: the one format everything trusts (DESIGN.md, "Chunk encoding").

    P  plaintext, at most 128 KiB (all-zero P is never encoded: flagged ZERO)
    C  zstd(P) at a pinned level if that saves >= 4 KiB, else P
    K  keyed BLAKE2b-256(key = convergence secret, P)
    X  XChaCha20-Poly1305(K, nonce = 24 zero bytes, C)
    T  BLAKE2b-256(X)

Readers check T before anything else, then decrypt with K, then decompress.
No I/O here: bytes in, bytes out. Batch helpers spread work over threads;
libsodium (through cffi), hashlib and zstd release the GIL for buffers of this
size, so threads scale across cores.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import zstandard
from nacl import bindings as sodium
from nacl.exceptions import CryptoError

from .errors import IntegrityError

CHUNK_SIZE = 128 * 1024
TAG_SIZE = 32
KEY_SIZE = 32
SECRET_SIZE = 32
ZSTD_LEVEL = 3
MIN_SAVING = 4 * 1024
# Bumped whenever the bytes an encoder produces for a given P could change
# (zstd level, framing). Recorded in manifests; decoding never depends on it.
CODEC_VERSION = 1

FLAG_ZERO = 0x01
FLAG_ZSTD = 0x02
_KNOWN_FLAGS = FLAG_ZERO | FLAG_ZSTD

_NONCE = bytes(24)
_ZERO_CHUNK = bytes(CHUNK_SIZE)
ZERO_TAG = bytes(TAG_SIZE)
ZERO_KEY = bytes(KEY_SIZE)

_AEAD_OVERHEAD = sodium.crypto_aead_xchacha20poly1305_ietf_ABYTES


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """What a keyring holds for one chunk: enough to fetch, verify and decode it."""

    tag: bytes
    key: bytes
    flags: int

    @property
    def is_zero(self) -> bool:
        return bool(self.flags & FLAG_ZERO)


ZERO_REF = ChunkRef(ZERO_TAG, ZERO_KEY, FLAG_ZERO)


@dataclass(frozen=True, slots=True)
class Encoded:
    """An encoded chunk: its keyring entry and, unless ZERO, its ciphertext."""

    ref: ChunkRef
    data: bytes  # X; empty for a ZERO chunk

    @property
    def tag(self) -> bytes:
        return self.ref.tag


ZERO_ENCODED = Encoded(ZERO_REF, b"")


class _Local(threading.local):
    """zstd contexts are not thread-safe; each thread keeps its own."""

    def __init__(self) -> None:
        self.cctx = zstandard.ZstdCompressor(
            level=ZSTD_LEVEL, write_checksum=False, write_content_size=True, write_dict_id=False
        )
        self.dctx = zstandard.ZstdDecompressor()


_local = _Local()


def tag_of(data: bytes | bytearray | memoryview) -> bytes:
    """The tag of ciphertext bytes: BLAKE2b-256."""
    return hashlib.blake2b(data, digest_size=TAG_SIZE).digest()


@dataclass(frozen=True, slots=True)
class VerifiedChunk:
    """Ciphertext already hashed to its tag: the site cache stores it without hashing again.

    Made by :func:`verified` (or from what :func:`encode` just returned, whose
    tag was computed from these very bytes); building one from bytes nobody
    hashed defeats the check it stands for.
    """

    tag: bytes
    data: bytes


def verified(tag: bytes, data: bytes) -> VerifiedChunk | None:
    """``data`` as a :class:`VerifiedChunk` if it hashes to ``tag``, else None."""
    return VerifiedChunk(tag, data) if tag_of(data) == tag else None


def is_zero(plain: bytes | bytearray | memoryview) -> bool:
    n = len(plain)
    # Slicing a bytes constant and comparing is a memcmp; much faster than any().
    return n == 0 or (n <= CHUNK_SIZE and plain == _ZERO_CHUNK[:n]) or (
        n > CHUNK_SIZE and not any(plain)
    )


def check_secret(secret: bytes) -> None:
    if len(secret) != SECRET_SIZE:
        raise ValueError(f"convergence secret must be {SECRET_SIZE} bytes")


def convergent_key(plain: bytes | bytearray | memoryview, secret: bytes) -> bytes:
    """K: the keyed BLAKE2b of a plaintext; equal keys mean equal plaintexts."""
    return hashlib.blake2b(plain, digest_size=KEY_SIZE, key=secret).digest()


def encode(plain: bytes | bytearray | memoryview, secret: bytes, *, key: bytes | None = None) -> Encoded:
    """Encode one plaintext chunk under a convergence secret.

    ``key`` is K when the caller has already computed it (to compare it with
    a previous version's) and saves the second hash pass.
    """
    if len(plain) > CHUNK_SIZE:
        raise ValueError(f"chunk of {len(plain)} bytes exceeds {CHUNK_SIZE}")
    if is_zero(plain):
        return ZERO_ENCODED
    plain = bytes(plain)
    if key is None:
        key = convergent_key(plain, secret)
    flags = 0
    body = plain
    if len(plain) > MIN_SAVING:
        packed = _local.cctx.compress(plain)
        if len(packed) <= len(plain) - MIN_SAVING:
            body, flags = packed, FLAG_ZSTD
    data = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(body, None, _NONCE, key)
    return Encoded(ChunkRef(tag_of(data), key, flags), data)


def verify(ref: ChunkRef, data: bytes) -> bool:
    """True when ``data`` is the ciphertext that ``ref`` names."""
    return not ref.is_zero and len(data) >= _AEAD_OVERHEAD and tag_of(data) == ref.tag


def decode(ref: ChunkRef, data: bytes | None, length: int = CHUNK_SIZE, *, check_tag: bool = True) -> bytes:
    """Verify and decode a chunk; raises IntegrityError on any mismatch.

    ``length`` is the plaintext length the keyring position implies (the last
    chunk of a disk or memory image may be shorter). ``check_tag=False`` is
    only for bytes that passed the tag check already: when they entered this
    site's cache, or in the source registry that fetched them. The AEAD under
    K, a key nobody without the convergence secret can compute, still rejects
    any byte changed or any chunk filed under the wrong tag since, and the
    hash pass (about a third of a cache hit's CPU) is saved where resume
    latency is made.
    """
    if ref.flags & ~_KNOWN_FLAGS:
        raise IntegrityError(f"chunk {ref.tag.hex()[:16]} has unknown flags {ref.flags:#x}")
    if ref.is_zero:
        return _ZERO_CHUNK[:length] if length <= CHUNK_SIZE else bytes(length)
    if data is None or (check_tag and tag_of(data) != ref.tag):
        raise IntegrityError(f"chunk {ref.tag.hex()[:16]} does not match its tag")
    try:
        body = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt(data, None, _NONCE, ref.key)
    except CryptoError:
        raise IntegrityError(f"chunk {ref.tag.hex()[:16]} does not decrypt under its key") from None
    if ref.flags & FLAG_ZSTD:
        try:
            body = _local.dctx.decompress(body, max_output_size=CHUNK_SIZE)
        except zstandard.ZstdError:
            raise IntegrityError(f"chunk {ref.tag.hex()[:16]} does not decompress") from None
    if len(body) != length:
        raise IntegrityError(
            f"chunk {ref.tag.hex()[:16]} decodes to {len(body)} bytes, expected {length}"
        )
    return body


# -- batches --------------------------------------------------------------------------

_pool_lock = threading.Lock()
_pools: dict[str, ThreadPoolExecutor] = {}
BACKGROUND_NICE = 10


def _shared_pool(name: str, initializer=None) -> ThreadPoolExecutor:
    """A process-wide pool sized to the cores, made on first use."""
    with _pool_lock:
        pool = _pools.get(name)
        if pool is None:
            pool = _pools[name] = ThreadPoolExecutor(
                max_workers=os.cpu_count() or 1, thread_name_prefix=name, initializer=initializer
            )
        return pool


def default_pool() -> Executor:
    """The codec's process-wide thread pool."""
    return _shared_pool("isrsync-codec")


def _lower_priority() -> None:
    # Linux: setpriority on a thread id touches that thread only.
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (OSError, AttributeError):
        pass


def background_pool() -> Executor:
    """Codec threads that give way to other work on the machine (niced).

    For decoding that runs beside a CPU-bound consumer, such as a memory
    image decoded while QEMU builds its machine and restores: on equal terms
    three runnable threads share two cores and QEMU, the critical path, gets
    two thirds of one; niced, the codec fills whatever QEMU leaves idle.
    """
    return _shared_pool("isrsync-codec-bg", _lower_priority)


BATCH = 8  # chunks per pool task (1 MiB): per-task overhead stays small


def _encode_batch(plains: list, secret: bytes) -> list[Encoded]:
    return [encode(p, secret) for p in plains]


def _decode_batch(items: list) -> list[bytes]:
    return [decode(*it) for it in items]


def encode_many(
    plains: Iterable[bytes], secret: bytes, pool: Executor | None = None
) -> Iterator[Encoded]:
    """Encode chunks on all cores, yielding results in input order.

    Streams: at most a bounded window of batches is in flight, so encoding a
    4 GiB image never holds more than a few MiB of it. Zero chunks are settled
    in the calling thread (a memcmp); the pool gets only real work.
    """
    check_secret(secret)
    pool = pool or default_pool()

    def batches() -> Iterator[list]:
        batch: list = []
        for plain in plains:
            batch.append(plain)
            if len(batch) == BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def submit(batch: list) -> list | Future:
        if all(is_zero(p) for p in batch):
            return [ZERO_ENCODED] * len(batch)
        return pool.submit(_encode_batch, batch, secret)

    for done in in_order(map(submit, batches()), pool):
        yield from done


def in_order(work: Iterable[Any], pool: Executor) -> Iterator[Any]:
    """The results of ``work`` (Futures from ``pool``, or results already at hand)
    in order, with a bounded window in flight: ``work`` is consumed lazily, so
    a 4 GiB image never has more than a few MiB submitted ahead of its reader.
    Futures still pending when the reader stops are cancelled.
    """
    window = 2 * (getattr(pool, "_max_workers", None) or os.cpu_count() or 1)
    pending: deque = deque()
    try:
        for item in work:
            pending.append(item)
            if len(pending) >= window:
                yield _done(pending.popleft())
        while pending:
            yield _done(pending.popleft())
    finally:
        for item in pending:
            if isinstance(item, Future):
                item.cancel()


def _done(item: object) -> Any:
    return item.result() if isinstance(item, Future) else item


def decode_many(
    items: Sequence[tuple[ChunkRef, bytes | None, int]], pool: Executor | None = None
) -> list[bytes]:
    """Decode many (ref, data, length) triples on all cores; any failure raises."""
    pool = pool or default_pool()
    futs = [pool.submit(_decode_batch, list(items[i : i + BATCH])) for i in range(0, len(items), BATCH)]
    out: list[bytes] = []
    for f in futs:
        out.extend(f.result())
    return out


def split(buf: bytes | memoryview) -> Iterator[memoryview]:
    """Split a buffer into CHUNK_SIZE views (the last may be shorter)."""
    view = memoryview(buf)
    for off in range(0, len(view), CHUNK_SIZE):
        yield view[off : off + CHUNK_SIZE]


def chunk_count(size: int) -> int:
    return (size + CHUNK_SIZE - 1) // CHUNK_SIZE


def chunk_length(size: int, index: int) -> int:
    """Plaintext length of chunk ``index`` of an object of ``size`` bytes."""
    return min(CHUNK_SIZE, size - index * CHUNK_SIZE)
