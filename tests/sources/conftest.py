"""Backends for the Source conformance suite (test_source_conformance.py): one suite, every Source.

(The backends' Held classes, the fallback source and the chunk helpers live in
sourcekit.py; this file lists the backends and their flags and wires them in.)

restic's backend suite is the model (DESIGN.md, "Style"): a backend hands the
suite a factory, and every test runs against every backend that can do what the
test needs. A factory takes a set of encoded chunks (tag -> ciphertext, from
:func:`isrsync.chunk.encode`) and returns a :class:`Held`: a real Source holding
exactly those chunks, plus the hooks the suite uses to break it.

Backends (``BACKENDS``):

* ``server``: :class:`ServerSource` over a :class:`MemoryStore`; the chunks are
  packed with :class:`PackWriter`, uploaded and committed as version 1 of a new
  parcel, as `init` does.
* ``server-http``: the same over :class:`HttpStore` against a real `isrsync
  serve` on loopback. One server per test module (``http_home``); a test that
  stops it gets a fresh one on the same data directory for the next test.
* ``cache-dir``: :class:`CacheDirSource` over a real site cache directory written
  by :meth:`SiteCache.put_many` (chunks in segments).
* ``cache-dir-pack``: the same, the chunks in packs adopted by
  :meth:`SiteCache.add_pack`.
* ``medium``: :class:`sneakernet.source.MediumSource` over a formatted medium
  (a directory) whose chunks a :class:`MediumWriter` wrote as packs and listed
  in the medium's own index.
* ``medium-beside``: the same over a formatted medium mounted read-only (a
  bind mount, as a DVD or a write-protected key), its chunks half in packs and
  half in loose one-chunk files, indexed by :func:`index_tree` into a
  directory beside it (a site cache's ``media/<id>/``).
* ``peer``: :class:`isrsync.swarm.peer.PeerSource` over real libtorrent sessions on
  loopback (peerkit.py): a seeder session seeds the packs of the chunks, whose
  torrents and pack index live on a :class:`MemoryStore` home; the source's own
  session fetches pieces with deadlines. ``truncate`` makes the home's index claim
  half the chunk; ``vanish`` closes the seeder's session. It has ``IO``: a
  300-chunk batch over 43 packs (2,443 piece deadlines) comes back whole with the
  loop never held (the "91 of 300 missing" bug was libtorrent's connection rate
  and listen backlog, docs/notes/NOTES-torrent.md).
* ``peer-direct``: the same, and the seeder also runs the direct path
  (:class:`isrsync.swarm.direct.DirectServer` over its verified pieces), announced
  to the source as the peer's direct port: every read here goes over it, checked
  by tag. ``vanish`` closes the seeder's direct server and session; ``hang`` blocks
  the seeder's cache reads on a worker (its loop, and the test's, run on).
* ``seed``: :class:`sneakernet.seed.SeedSource` over a raw image file in the
  clear whose 128 KiB chunks are the chunks' plaintexts, seeded by
  :func:`seed_image` into a site cache; the source encodes each chunk as it
  reads it. An image holds full chunks only (but for its last), so this
  backend is given full-size chunks (``full_chunks``). Its hooks: ``damage``
  flips a byte and keeps the file's mtime (bit rot on a DVD); ``truncate``
  rewrites the index to say half the chunk is not in the file; ``vanish``
  removes the image; ``hang`` puts a FIFO in its place.

Hooks (call them before the source's first read unless noted; each changes the
backing store, never the Source object):

* ``damage(tag)``: the stored bytes of ``tag`` are wrong (one byte flipped).
* ``truncate(tag)``: the index claims half the length, so the source answers a
  truncated copy (a backend whose reader checks lengths may answer nothing).
* ``vanish()``: the backing goes away, also mid-use: the directory is removed;
  the server process is killed; the in-memory home forgets the parcel.
* ``hang()``: from now on a read does not return until cleanup.
* ``cleanup()``: undo hangs, close the source and what it talks to (always run).

Capability flags (``Caps``) and who lacks which, with the reason:

* ``DAMAGE``, ``TRUNCATE``, ``VANISH``: every backend. For the media, ``truncate``
  rewrites the index (with a valid checksum) to claim half the chunk, and
  ``vanish`` removes the tree (``medium``) or lazily unmounts the read-only
  mount and removes the tree behind it (``medium-beside``: a pulled key).
* ``VANISH_FAILS_MID_USE``: after the source has read once, a vanished backing
  makes it fail as a whole (an exception or an empty answer). The media have
  it: MediumSource checks on every request that the directory it opened is
  still the one at that path (device and inode), so a removed tree or an
  unmounted medium fails even though its open files would still read. The
  cache-dir backends lack it: POSIX keeps unlinked files readable through descriptors
  already open, and CacheDirSource keeps its index.db and segment/pack files
  open, so after ``rm -r`` it still answers, correctly. (Nothing short of FUSE
  or a device-mapper target can make those reads fail with EIO here.)
* ``HANG``: ``server-http`` pauses the server (SIGSTOP on its process group,
  SIGCONT at cleanup); the cache-dir and medium backends put a FIFO where each segment or
  pack file was, so the source's own worker blocks in open(2) exactly as on a
  hung network filesystem (cleanup opens the write end to release it). ``server``
  lacks it: the in-memory store does no I/O, and its calls take a threading lock
  synchronously, so stalling it would freeze the event loop, not hang a source.
* ``CLOSE_ENDS``: after ``close()`` a read fails (cleanly). The server backends
  lack it by design: ``ServerSource.close()`` leaves the Store open because the
  store belongs to the site, so a closed ServerSource still answers.
* ``peer`` lacks ``DAMAGE``: libtorrent checks every piece against the torrent's
  merkle tree, so bytes damaged at the peer never leave the source at all (the
  suite's damage test needs a source that answers wrong bytes; tests/swarm checks
  that corrupted pieces are refused). It lacks ``VANISH_FAILS_MID_USE``: pieces
  fetched before the peer went stay in the site's own torrent storage and are
  still answered, correctly. It lacks ``HANG``: its seeder is a session in the
  test process, which cannot stall without stalling the test (tests/swarm stops
  a seeder process with SIGSTOP instead: a peer that vanishes mid-piece).
* ``peer-direct`` lacks ``DAMAGE`` for the same reason one step earlier: a peer's
  direct server checks each chunk's tag before sending it, so a damaged copy is
  answered as not held (tests/swarm/test_direct.py has a lying peer, which is
  banned). It has ``VANISH_FAILS_MID_USE``: its reads never went into the site's
  torrent storage, and a peer whose direct path failed is not asked for 5 s.
* ``IO``: the backing does real file or socket I/O, which ``get_many`` must keep
  off the event loop (the ticker test). ``server`` lacks it: the in-memory store
  answers without ever suspending, so there is no I/O to keep off the loop.

Fixtures: ``backend`` (a :class:`BackendSpec`), ``make_source`` (the factory),
``chunks`` and ``held`` (24 random chunks and a source holding them),
``registry`` (a SourceRegistry over a fresh site cache), ``fallback`` (an honest
:class:`DictSource` of ``chunks``, asked after the source under test) and
``http_home`` (the module's server, started only if a server-http test runs).

``pytest_generate_tests`` parametrizes every test that takes ``backend`` over
the backends whose flags cover the test's ``@pytest.mark.needs(...)``; a test
that does not apply to a backend is not generated for it (no skips).
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from peerkit import PeerDirectHeld, PeerHeld
from sourcekit import (
    CacheDirHeld,
    DictSource,
    Held,
    HttpHome,
    HttpServerHeld,
    MediumBesideHeld,
    MediumHeld,
    MemoryServerHeld,
    SeedHeld,
    commit_chunks,
    make_chunks,
    write_cache_dir,
    write_medium,
    write_readonly_medium,
)

from isrsync.chunk import CHUNK_SIZE
from isrsync.site.cache import SiteCache
from isrsync.site.registry import SourceRegistry
from isrsync.store.memory import MemoryStore


class Caps(str, enum.Enum):
    DAMAGE = "damage"
    TRUNCATE = "truncate"
    VANISH = "vanish"
    VANISH_FAILS_MID_USE = "vanish_fails_mid_use"
    HANG = "hang"
    CLOSE_ENDS = "close_ends"
    IO = "io"


@dataclass(frozen=True)
class BackendSpec:
    name: str
    caps: frozenset[Caps]
    lacks: dict[Caps, str] = field(default_factory=dict)  # capability -> why not
    # A plaintext seed is an image: its chunks are 128 KiB but for the last one.
    full_chunks: bool = False

    def __post_init__(self) -> None:
        assert set(self.caps) | set(self.lacks) == set(Caps), f"{self.name}: say why each flag is missing"


_ALL = frozenset(Caps)
BACKENDS = [
    BackendSpec("server", _ALL - {Caps.HANG, Caps.CLOSE_ENDS, Caps.IO}, {
        Caps.HANG: "the in-memory store does no I/O; a stall would freeze the event loop, not hang the source",
        Caps.IO: "the in-memory store answers without ever suspending: there is no I/O to keep off the loop",
        Caps.CLOSE_ENDS: "ServerSource.close() leaves the Store open by design (it belongs to the site)",
    }),
    BackendSpec("server-http", _ALL - {Caps.CLOSE_ENDS}, {
        Caps.CLOSE_ENDS: "ServerSource.close() leaves the Store open by design (it belongs to the site)",
    }),
    *(BackendSpec(name, _ALL - {Caps.VANISH_FAILS_MID_USE}, {
        Caps.VANISH_FAILS_MID_USE: "files the source already opened stay readable after rm -r (POSIX unlink)",
    }) for name in ("cache-dir", "cache-dir-pack")),
    BackendSpec("medium", _ALL),
    BackendSpec("medium-beside", _ALL),
    BackendSpec("seed", _ALL, full_chunks=True),
    BackendSpec("peer", _ALL - {Caps.DAMAGE, Caps.VANISH_FAILS_MID_USE, Caps.HANG}, {
        Caps.DAMAGE: "libtorrent checks each piece against the torrent's merkle tree: damaged bytes never get out",
        Caps.VANISH_FAILS_MID_USE: "pieces fetched before the peer went stay in the site's own storage, correct",
        Caps.HANG: "the seeder is a session in the test process (tests/swarm SIGSTOPs a seeder process instead)",
    }),
    BackendSpec("peer-direct", _ALL - {Caps.DAMAGE}, {
        Caps.DAMAGE: "the peer's direct server checks each tag before sending: a damaged copy is answered as absent",
    }),
]
BY_NAME = {b.name: b for b in BACKENDS}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "needs(*caps): Source capabilities (conftest Caps) a test needs")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    needs: set[Caps] = set()
    for m in metafunc.definition.iter_markers("needs"):
        needs.update(Caps(c) for c in m.args)
    params = [pytest.param(b.name, id=b.name) for b in BACKENDS if needs <= b.caps]
    assert params, f"{metafunc.function.__name__}: no backend has {sorted(needs)}"
    metafunc.parametrize("backend", params, indirect=True)


# -- fixtures -------------------------------------------------------------------------------


def _live_server_cls(config: pytest.Config) -> type:
    """tests/conftest.py's LiveServer class (tests/ is rootless: it cannot be imported)."""
    root = Path(__file__).resolve().parent.parent / "conftest.py"
    for plugin in config.pluginmanager.get_plugins():
        cls = getattr(plugin, "LiveServer", None)
        where = getattr(plugin, "__file__", None)
        if isinstance(cls, type) and where and Path(where).resolve() == root:
            return cls
    raise RuntimeError("tests/conftest.py's LiveServer is not loaded")


@pytest.fixture(scope="module")
def http_home(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One `isrsync serve` for the whole module, started on first use."""
    home = HttpHome(_live_server_cls(request.config), tmp_path_factory.mktemp("sources-http") / "data")
    try:
        yield home
    finally:
        home.close()


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> BackendSpec:
    return BY_NAME[request.param]


MakeSource = Callable[[dict[bytes, bytes]], Awaitable[Held]]


@pytest.fixture
async def make_source(backend: BackendSpec, request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[MakeSource]:
    """``await make_source(chunks)``: a Held of this backend; all are cleaned up at teardown."""
    made: list[Held] = []
    home = request.getfixturevalue("http_home") if backend.name == "server-http" else None
    memory = MemoryStore("alice") if backend.name == "server" else None

    async def make(chunks: dict[bytes, bytes]) -> Held:
        n = len(made)
        held: Held
        if backend.name == "server":
            assert memory is not None
            pid, packs = await commit_chunks(memory, chunks, tmp_path / f"work-{n}")
            held = MemoryServerHeld(memory.client(), pid, packs, chunks)
        elif backend.name == "server-http":
            assert home is not None
            store = await asyncio.to_thread(home.store)
            try:
                pid, packs = await commit_chunks(store, chunks, tmp_path / f"work-{n}")
            except BaseException:
                await store.close()
                raise
            held = HttpServerHeld(home, store, pid, packs, chunks)
        elif backend.name == "medium":
            path = tmp_path / f"medium-{n}"
            await asyncio.to_thread(write_medium, path, chunks)
            held = MediumHeld(path, chunks)
        elif backend.name == "peer":
            held = await PeerHeld.make(chunks, tmp_path / f"peer-{n}")
        elif backend.name == "peer-direct":
            held = await PeerDirectHeld.make(chunks, tmp_path / f"peer-direct-{n}")
        elif backend.name == "seed":
            held = await asyncio.to_thread(SeedHeld, tmp_path / f"image-{n}.raw", tmp_path / f"site-{n}", chunks)
        elif backend.name == "medium-beside":
            data, mount, beside = tmp_path / f"dvd-{n}", tmp_path / f"mnt-{n}", tmp_path / f"site-{n}" / "media" / "dvd"
            await asyncio.to_thread(write_readonly_medium, data, mount, beside, chunks)
            held = MediumBesideHeld(mount, data, beside, chunks)
        else:
            path = tmp_path / f"cache-{n}"
            await asyncio.to_thread(write_cache_dir, path, chunks, packs=backend.name == "cache-dir-pack")
            held = CacheDirHeld(path, chunks)
        made.append(held)
        return held

    try:
        yield make
    finally:
        for h in reversed(made):
            await h.cleanup()


@pytest.fixture
def chunks(backend: BackendSpec) -> dict[bytes, bytes]:
    """24 encoded chunks of random plaintext (lengths from 1 byte to a full chunk; all full
    for a backend that is an image)."""
    return make_chunks(24, size=CHUNK_SIZE if backend.full_chunks else None)


@pytest.fixture
async def held(make_source: MakeSource, chunks: dict[bytes, bytes]) -> Held:
    return await make_source(chunks)


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[SourceRegistry]:
    """A registry over a fresh site cache (the sources are the test's to add)."""
    cache = SiteCache(tmp_path / "site")
    try:
        yield SourceRegistry(cache)
    finally:
        cache.close()


@pytest.fixture
def fallback(chunks: dict[bytes, bytes]) -> DictSource:
    """An honest source of every chunk of ``chunks``, asked after the one under test."""
    return DictSource(chunks)
