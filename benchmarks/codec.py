"""Chunk codec benchmark: isrsync.chunk against the floor of its own primitives.

What it measures
----------------
Four data sets of about N MiB each (default 64), split in 128 KiB chunks:

* ``zeros``  - all-zero chunks (flagged ZERO, never encrypted);
* ``text``   - the Python stdlib's ``.py`` sources, concatenated and repeated/truncated;
* ``random`` - ``os.urandom`` (zstd never saves 4 KiB, so the plaintext is encrypted);
* ``binary`` - a real executable repeated to size: the first of ``/boot/vmlinuz-*``,
  the Python interpreter, ``/usr/bin/qemu-system-x86_64``, libpython that exists and
  is at least 1 MiB (a launcher stub of a few KiB repeated to 64 MiB would make every
  chunk compress like a run of copies, which is not what a disk image holds).

For each data set and for encode and decode:

* the codec's throughput (MB/s of plaintext, MB = 10**6 bytes) on 1 thread
  (``chunk.encode`` / ``chunk.decode`` in a loop), on exactly 2 threads and on
  ``os.cpu_count()`` threads (``encode_many`` / ``decode_many`` with a
  ``ThreadPoolExecutor`` of that many workers);
* the FLOOR: on the same bytes, in the same run, each primitive the codec must call
  timed alone in a tight loop and summed. Encode: zero check (``==`` against a
  ``bytes(CHUNK_SIZE)``) for every chunk; for non-zero chunks zstd compress at
  ``chunk.ZSTD_LEVEL``, keyed BLAKE2b-256, XChaCha20-Poly1305 encrypt of what the
  codec would encrypt (compressed form if it saves >= MIN_SAVING, else plaintext) and
  BLAKE2b-256 of the ciphertext. Decode: BLAKE2b-256 of the ciphertext, decrypt and,
  where compressed, zstd decompress. Zero chunks call no primitive on decode, so
  ``zeros`` decode has no floor (n/a) and its ratio is not a target.

Reported: ratio = codec 1-thread / floor (target >= 0.7) and scaling = 2 threads /
1 thread (target >= 1.8 on a machine with at least 2 cores, i.e. near 2.0; not a
target for ``zeros``, whose only work is a memcmp done while holding the GIL).
Every throughput is the MEDIAN of R repeats. Codec and floor runs are interleaved
within each repeat, and ratio and scaling are the median of the per-repeat ratios,
so a slow spell of a noisy (virtual) machine hits both sides of a ratio alike.
Each repeat also times one big hashlib call on 1 thread against two half-size calls
on 2 threads: the scaling the machine itself offers right then, printed per data set
so a scaling miss can be told apart from a VM whose second core was busy elsewhere.

Run
---
    /tmp/venv/bin/python benchmarks/codec.py                  # 64 MiB, 5 repeats, table
    /tmp/venv/bin/python benchmarks/codec.py --mib 16 --repeat 3
    /tmp/venv/bin/python benchmarks/codec.py --json           # same numbers as JSON
    /tmp/venv/bin/python benchmarks/codec.py --breakdown      # plus per-primitive floor

Exit status is 0 whether or not the targets are met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import statistics
import sys
import sysconfig
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zstandard
from nacl import bindings as sodium
from rich.console import Console
from rich.table import Table

from isrsync import chunk

RATIO_TARGET = 0.7
SCALING_TARGET = 1.8
# A "real binary" smaller than this is a launcher stub (pyenv's python is ~17 KiB):
# repeated to size it would be a highly repetitive, text-like data set.
MIN_BINARY_SIZE = 1 << 20
# Enough chunks to start every pool worker and build its thread-local zstd contexts
# before timing, so the first repeat is not penalised.
WARMUP_CHUNKS = 32

_NONCE = bytes(24)
_ZERO = bytes(chunk.CHUNK_SIZE)
_SECRET = bytes(range(chunk.SECRET_SIZE))

Chunks = list[bytes]
Items = list[tuple[chunk.ChunkRef, bytes, int]]


# -- data sets ----------------------------------------------------------------------


def _repeat_to(source: bytes, size: int) -> bytes:
    return (source * (size // len(source) + 1))[:size]


def _stdlib_text(size: int) -> bytes:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    parts: list[bytes] = []
    total = 0
    # Sorted so every run (and every machine with the same Python) sees the same bytes.
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        parts.append(data)
        total += len(data)
        if total >= size:
            break
    return _repeat_to(b"".join(parts), size)


def _binary_candidates() -> list[Path]:
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    ldlib = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY") or ""
    return [
        *(Path(p) for p in sorted(glob.glob("/boot/vmlinuz-*"), reverse=True)),
        Path(sys.executable).resolve(),
        Path("/usr/bin/qemu-system-x86_64"),
        *([Path(libdir, ldlib).resolve()] if libdir and ldlib else []),
    ]


def _real_binary(size: int) -> tuple[bytes, str] | None:
    existing = [p for p in _binary_candidates() if p.is_file() and os.access(p, os.R_OK)]
    for path in existing:
        if path.stat().st_size >= MIN_BINARY_SIZE:
            return _repeat_to(path.read_bytes(), size), str(path)
    if existing:
        return _repeat_to(existing[0].read_bytes(), size), f"{existing[0]} (small)"
    return None


def _split(data: bytes) -> Chunks:
    # bytes chunks, as a reader would hand over; memoryviews would add a copy in encode.
    return [data[off : off + chunk.CHUNK_SIZE] for off in range(0, len(data), chunk.CHUNK_SIZE)]


def datasets(size: int) -> list[tuple[str, str, Callable[[], Chunks]]]:
    """(name, description, builder); built lazily so only one set is in memory at once."""
    out: list[tuple[str, str, Callable[[], Chunks]]] = [
        ("zeros", "all-zero chunks", lambda: _split(bytes(size))),
        ("text", "Python stdlib .py sources", lambda: _split(_stdlib_text(size))),
        ("random", "os.urandom", lambda: _split(os.urandom(size))),
    ]
    binary = _real_binary(size)
    if binary is not None:
        data, source = binary
        out.append(("binary", source, lambda: _split(data)))
    return out


# -- what the codec must do, precomputed with the primitives -------------------------


@dataclass
class Work:
    """The per-chunk inputs of every primitive, so each can be timed alone."""

    chunks: Chunks
    nonzero: Chunks
    keys: list[bytes]
    bodies: list[bytes]  # what gets encrypted: compressed or raw
    packed: list[bytes]  # compressed bodies only (what decode decompresses)
    ciphertexts: list[bytes]
    tags: list[bytes]


def prepare(chunks: Chunks) -> Work:
    cctx = zstandard.ZstdCompressor(level=chunk.ZSTD_LEVEL, write_checksum=False)
    nonzero = [p for p in chunks if p != _ZERO[: len(p)]]
    keys, bodies, packed, xs, tags = [], [], [], [], []
    for p in nonzero:
        key = hashlib.blake2b(p, digest_size=32, key=_SECRET).digest()
        body = p
        if len(p) > chunk.MIN_SAVING:
            c = cctx.compress(p)
            if len(c) <= len(p) - chunk.MIN_SAVING:
                body = c
                packed.append(c)
        x = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt(body, None, _NONCE, key)
        keys.append(key)
        bodies.append(body)
        xs.append(x)
        tags.append(hashlib.blake2b(x, digest_size=32).digest())
    return Work(chunks, nonzero, keys, bodies, packed, xs, tags)


def check_floor_matches_codec(work: Work, encoded: list[chunk.Encoded]) -> None:
    """The floor is only a floor if it does the codec's work: same tags, same sizes."""
    codec_tags = [e.tag for e in encoded if not e.ref.is_zero]
    if codec_tags != work.tags:
        raise SystemExit("floor model disagrees with chunk.encode (tags differ): fix the benchmark")
    sample = encoded[len(encoded) // 2]
    plain = chunk.decode(sample.ref, sample.data, len(work.chunks[len(encoded) // 2]))
    if plain != work.chunks[len(encoded) // 2]:
        raise SystemExit("chunk.decode did not round-trip")


# -- timed loops ---------------------------------------------------------------------
# Each binds what it calls to locals so the floor is the primitives' cost rather than
# Python attribute lookups; every loop drops its results at once so neither side pays
# for keeping 64 MiB alive (decode_many alone cannot: it returns a list).


def _clock(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


_CEILING_BUF = memoryview(os.urandom(32 << 20))


def machine_scaling() -> float:
    """2-thread / 1-thread speed-up of work that never touches the GIL in between.

    One hashlib call per thread, so it measures only what the (virtual) machine
    gives two threads; a codec scaling below this is not the codec's fault.
    """
    half = len(_CEILING_BUF) // 2

    def hash_part(view: memoryview) -> None:
        hashlib.blake2b(view).digest()

    one = _clock(lambda: hash_part(_CEILING_BUF))

    def two_threads() -> None:
        threads = [
            threading.Thread(target=hash_part, args=(_CEILING_BUF[i * half : (i + 1) * half],))
            for i in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    return one / _clock(two_threads)


def floor_encode(work: Work) -> dict[str, float]:
    cctx = zstandard.ZstdCompressor(level=chunk.ZSTD_LEVEL, write_checksum=False)
    blake = hashlib.blake2b
    enc = sodium.crypto_aead_xchacha20poly1305_ietf_encrypt
    zero, secret, nonce = _ZERO, _SECRET, _NONCE

    def zero_check() -> None:
        for p in work.chunks:
            p == zero  # noqa: B015 - the comparison is the work

    def compress() -> None:
        c = cctx.compress
        for p in work.nonzero:
            if len(p) > chunk.MIN_SAVING:
                c(p)

    def keyed_hash() -> None:
        for p in work.nonzero:
            blake(p, digest_size=32, key=secret).digest()

    def encrypt() -> None:
        for body, key in zip(work.bodies, work.keys, strict=True):
            enc(body, None, nonce, key)

    def tag() -> None:
        for x in work.ciphertexts:
            blake(x, digest_size=32).digest()

    times = {"zero_check": _clock(zero_check)}
    if work.nonzero:
        times |= {
            "zstd_compress": _clock(compress),
            "blake2b_key": _clock(keyed_hash),
            "encrypt": _clock(encrypt),
            "blake2b_tag": _clock(tag),
        }
    return times


def floor_decode(work: Work) -> dict[str, float]:
    dctx = zstandard.ZstdDecompressor()
    blake = hashlib.blake2b
    dec = sodium.crypto_aead_xchacha20poly1305_ietf_decrypt
    nonce, limit = _NONCE, chunk.CHUNK_SIZE

    def tag() -> None:
        for x in work.ciphertexts:
            blake(x, digest_size=32).digest()

    def decrypt() -> None:
        for x, key in zip(work.ciphertexts, work.keys, strict=True):
            dec(x, None, nonce, key)

    def decompress() -> None:
        d = dctx.decompress
        for c in work.packed:
            d(c, max_output_size=limit)

    # Primitives with nothing to do are left out, not timed as an empty loop.
    times: dict[str, float] = {}
    if work.nonzero:
        times |= {"blake2b_tag": _clock(tag), "decrypt": _clock(decrypt)}
    if work.packed:
        times["zstd_decompress"] = _clock(decompress)
    return times


def codec_encode_1(chunks: Chunks) -> float:
    def run() -> None:
        encode, secret = chunk.encode, _SECRET
        for p in chunks:
            encode(p, secret)

    return _clock(run)


def codec_encode_pool(chunks: Chunks, pool: ThreadPoolExecutor) -> float:
    def run() -> None:
        for _ in chunk.encode_many(chunks, _SECRET, pool):
            pass

    return _clock(run)


def codec_decode_1(items: Items) -> float:
    def run() -> None:
        decode = chunk.decode
        for ref, data, length in items:
            decode(ref, data, length)

    return _clock(run)


def codec_decode_pool(items: Items, pool: ThreadPoolExecutor) -> float:
    return _clock(lambda: chunk.decode_many(items, pool))


# -- results -------------------------------------------------------------------------


@dataclass
class Row:
    dataset: str
    op: str  # "encode" | "decode"
    nbytes: int
    one: list[float] = field(default_factory=list)  # seconds per repeat
    two: list[float] = field(default_factory=list)
    all_cores: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    primitives: dict[str, list[float]] = field(default_factory=dict)
    # False when the floor has no primitive to run (decoding only zero chunks):
    # an empty loop's few microseconds would pose as a throughput.
    floor_applicable: bool = True

    def mbps(self, seconds: list[float]) -> float:
        t = statistics.median(seconds)
        return self.nbytes / t / 1e6 if t > 0 else float("inf")

    def summary(self) -> dict[str, Any]:
        # Ratios pair the runs of one repeat (taken back to back) before the median,
        # so a slow spell of the host that spans a repeat cancels out of them.
        ratio = (
            statistics.median(f / o for f, o in zip(self.floor, self.one, strict=True))
            if self.floor_applicable
            else None
        )
        return {
            "dataset": self.dataset,
            "op": self.op,
            "one_thread_mbps": self.mbps(self.one),
            "floor_mbps": self.mbps(self.floor) if self.floor_applicable else None,
            "ratio": ratio,
            "two_thread_mbps": self.mbps(self.two),
            "scaling": statistics.median(o / t for o, t in zip(self.one, self.two, strict=True)),
            "all_cores_mbps": self.mbps(self.all_cores),
            "floor_primitives_mbps": {name: self.mbps(ts) for name, ts in self.primitives.items()},
        }


def _add(row: Row, prims: dict[str, float]) -> None:
    for name, t in prims.items():
        row.primitives.setdefault(name, []).append(t)
    row.floor.append(sum(prims.values()))  # 0.0 when nothing applies; see floor_applicable


def bench_dataset(
    name: str, chunks: Chunks, repeat: int, pool2: ThreadPoolExecutor, pool_all: ThreadPoolExecutor
) -> tuple[Row, Row, dict[str, Any]]:
    nbytes = sum(len(p) for p in chunks)
    work = prepare(chunks)
    encoded = list(chunk.encode_many(chunks, _SECRET, pool2))
    check_floor_matches_codec(work, encoded)
    items: Items = [(e.ref, e.data, len(p)) for e, p in zip(encoded, chunks, strict=True)]
    stored = sum(len(e.data) for e in encoded)
    del encoded

    # Untimed warm-up: start pool threads, build their zstd contexts, fault in buffers.
    warm = chunks[:WARMUP_CHUNKS]
    for pool in (pool2, pool_all):
        for _ in chunk.encode_many(warm, _SECRET, pool):
            pass
        chunk.decode_many(items[:WARMUP_CHUNKS], pool)
    codec_encode_1(warm)
    codec_decode_1(items[:WARMUP_CHUNKS])

    enc = Row(name, "encode", nbytes)
    dec = Row(name, "decode", nbytes, floor_applicable=bool(work.nonzero))
    ceiling: list[float] = []
    for _ in range(repeat):
        ceiling.append(machine_scaling())
        _add(enc, floor_encode(work))
        enc.one.append(codec_encode_1(chunks))
        enc.two.append(codec_encode_pool(chunks, pool2))
        enc.all_cores.append(codec_encode_pool(chunks, pool_all))
        _add(dec, floor_decode(work))
        dec.one.append(codec_decode_1(items))
        dec.two.append(codec_decode_pool(items, pool2))
        dec.all_cores.append(codec_decode_pool(items, pool_all))

    info = {
        "machine_scaling": statistics.median(ceiling),
        "chunks": len(chunks),
        "zero_chunks": len(chunks) - len(work.nonzero),
        "compressed_chunks": len(work.packed),
        "stored_bytes": stored,
    }
    return enc, dec, info


# -- verdict and output --------------------------------------------------------------


def verdict(
    rows: Sequence[dict[str, Any]], infos: dict[str, dict[str, Any]], cores: int
) -> tuple[bool, list[str]]:
    failures: list[str] = []
    for r in rows:
        label = f"{r['dataset']} {r['op']}"
        if r["ratio"] is not None and r["ratio"] < RATIO_TARGET:
            failures.append(f"{label} ratio {r['ratio']:.2f} < {RATIO_TARGET}")
        if cores >= 2 and r["dataset"] != "zeros" and r["scaling"] < SCALING_TARGET:
            machine = infos[r["dataset"]]["machine_scaling"]
            # Still a failure, but say so when the machine could not do better either.
            excuse = f" (machine itself: {machine:.2f})" if machine < SCALING_TARGET else ""
            failures.append(f"{label} scaling {r['scaling']:.2f} < {SCALING_TARGET}{excuse}")
    return not failures, failures


def _fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "n/a"
    if v == float("inf"):
        return "inf"
    return f"{v:,.{digits}f}"


def print_table(
    console: Console,
    rows: Sequence[dict[str, Any]],
    infos: dict[str, dict[str, Any]],
    meta: dict[str, Any],
    breakdown: bool,
) -> None:
    cores = meta["cpu_count"]
    table = Table(
        title=(
            f"isrsync.chunk codec vs floor: {meta['mib']} MiB per data set, "
            f"median of {meta['repeat']}, {cores} cores, MB = 10^6 bytes"
        ),
        caption="ratio = codec/floor and scaling = 2-thread/1-thread: median of per-repeat ratios",
    )
    for col in ("dataset", "op"):
        table.add_column(col)
    for col in (
        "1-thread MB/s",
        "floor MB/s",
        "ratio",
        "2-thread MB/s",
        "scaling",
        f"all-cores ({cores}) MB/s",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        ratio_style = (
            "" if r["ratio"] is None else ("green" if r["ratio"] >= RATIO_TARGET else "red")
        )
        scale_ok = r["dataset"] == "zeros" or cores < 2 or r["scaling"] >= SCALING_TARGET
        table.add_row(
            r["dataset"],
            r["op"],
            _fmt(r["one_thread_mbps"]),
            _fmt(r["floor_mbps"]),
            f"[{ratio_style}]{_fmt(r['ratio'], 2)}[/]" if ratio_style else _fmt(r["ratio"], 2),
            _fmt(r["two_thread_mbps"]),
            f"[{'green' if scale_ok else 'red'}]{r['scaling']:.2f}[/]",
            _fmt(r["all_cores_mbps"]),
            end_section=r["op"] == "decode",
        )
    console.print(table)
    for name, info in infos.items():
        console.print(
            f"  {name}: {info['source']}; {info['chunks']} chunks, {info['zero_chunks']} zero, "
            f"{info['compressed_chunks']} stored compressed, "
            f"{info['stored_bytes'] / (info['chunks'] * chunk.CHUNK_SIZE):.0%} of plaintext "
            "stored; "
            f"machine 2-thread scaling meanwhile {info['machine_scaling']:.2f}"
        )
    if breakdown:
        prim = Table(title="floor by primitive (MB/s of the data set's plaintext)")
        prim.add_column("dataset")
        prim.add_column("op")
        prim.add_column("primitives", overflow="fold")
        for r in rows:
            prim.add_row(
                r["dataset"],
                r["op"],
                "  ".join(f"{k} {_fmt(v)}" for k, v in r["floor_primitives_mbps"].items()),
            )
        console.print(prim)
    ok, failures = verdict(rows, infos, cores)
    if ok:
        console.print(
            f"[bold green]Targets met[/]: 1-thread ratio >= {RATIO_TARGET} everywhere"
            + (f", 2-thread scaling >= {SCALING_TARGET} (zeros excluded)." if cores >= 2 else ".")
        )
    else:
        console.print(f"[bold red]Targets NOT met[/] ({len(failures)}): " + "; ".join(failures))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mib", type=int, default=64, help="size of each data set in MiB (default 64)"
    )
    parser.add_argument(
        "--repeat", type=int, default=5, help="repeats per measurement; the median is reported"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument(
        "--breakdown", action="store_true", help="also print the floor per primitive"
    )
    args = parser.parse_args(argv)
    if args.mib < 1 or args.repeat < 1:
        parser.error("--mib and --repeat must be >= 1")

    size = args.mib * 1024 * 1024
    cores = os.cpu_count() or 1
    # Piped output would otherwise wrap the table at 80 columns.
    console = Console(stderr=args.json, width=max(Console().width, 120))
    rows: list[dict[str, Any]] = []
    infos: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    with (
        ThreadPoolExecutor(2, thread_name_prefix="bench2") as pool2,
        ThreadPoolExecutor(cores, thread_name_prefix="benchN") as pool_all,
    ):
        for name, source, build in datasets(size):
            if not args.json:
                console.print(f"[dim]benchmarking {name}...[/]")
            chunks = build()
            enc, dec, info = bench_dataset(name, chunks, args.repeat, pool2, pool_all)
            del chunks
            infos[name] = {"source": source, **info}
            rows += [enc.summary(), dec.summary()]

    meta = {
        "mib": args.mib,
        "repeat": args.repeat,
        "cpu_count": cores,
        "chunk_size": chunk.CHUNK_SIZE,
        "zstd_level": chunk.ZSTD_LEVEL,
        "python": sys.version.split()[0],
        "zstandard": zstandard.__version__,
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
    ok, failures = verdict(rows, infos, cores)
    if args.json:
        print(
            json.dumps(
                {
                    "meta": meta,
                    "targets": {"ratio": RATIO_TARGET, "scaling": SCALING_TARGET},
                    "datasets": infos,
                    "results": rows,
                    "targets_met": ok,
                    "failures": failures,
                },
                indent=2,
            )
        )
    else:
        print_table(console, rows, infos, meta, args.breakdown)
        console.print(f"[dim]elapsed {meta['elapsed_s']} s[/]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
