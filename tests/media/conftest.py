"""Fixtures for the media tests: chunks, a site cache and registry, and real mounts.

Every mount made here is undone at teardown, even when the test failed (in
reverse order, lazily as a last resort so a leaked descriptor never leaves a
mount behind), after the sources and caches that may hold files on it.
"""

from __future__ import annotations

import contextlib
import gc
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from mediakit import make_chunks

from isrsync.site.cache import SiteCache
from isrsync.site.registry import SourceRegistry


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _unmount(path: Path) -> None:
    for _ in range(20):
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode == 0:
            return
        if subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode != 0:
            return
        gc.collect()  # an unreachable source may still hold a descriptor
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class Mounts:
    """Make tmpfs and read-only bind mounts; all are undone by the fixture's teardown."""

    def __init__(self) -> None:
        self.stack: list[Path] = []

    def tmpfs(self, where: Path, options: str = "size=3m") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where))
        self.stack.append(where)
        return where

    def bind_readonly(self, src: Path, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        _run("mount", "--bind", str(src), str(where))
        self.stack.append(where)
        _run("mount", "-o", "remount,bind,ro", str(where))
        return where

    def pull(self, where: Path) -> None:
        """Yank it: a lazy unmount, as when a key is pulled while files on it are open."""
        _run("umount", "-l", str(where))

    def cleanup(self) -> None:
        while self.stack:
            _unmount(self.stack.pop())


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.cleanup()


@pytest.fixture
def chunks() -> dict[bytes, bytes]:
    """32 encoded chunks of random plaintext (lengths from 1 byte to a full chunk)."""
    return make_chunks(32)


@pytest.fixture
async def registry(tmp_path: Path, mounts: Mounts) -> AsyncIterator[SourceRegistry]:
    """A registry over a fresh site cache; its sources are closed before any mount goes."""
    cache = SiteCache(tmp_path / "site")
    reg = SourceRegistry(cache)
    try:
        yield reg
    finally:
        with contextlib.suppress(Exception):
            await reg.close()
        cache.close()
