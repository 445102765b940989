"""Fixtures for the site-cache tests: chunks, caches, and real (tmpfs / bind) mounts.

Every mount made here is undone at teardown, even when the test failed: caches
opened through :func:`open_cache` are closed first, then the mounts are
unmounted in reverse order (lazily as a last resort, so a leaked descriptor can
never leave a mount behind).
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from isrsync.chunk import CHUNK_SIZE, Encoded, encode
from isrsync.site.cache import SiteCache


@pytest.fixture
def secret() -> bytes:
    return os.urandom(32)


@pytest.fixture
def make_chunks(secret: bytes) -> Callable[..., list[Encoded]]:
    """``make_chunks(n, size=CHUNK_SIZE)``: n random (incompressible) encoded chunks."""

    def make(n: int, size: int = CHUNK_SIZE) -> list[Encoded]:
        return [encode(os.urandom(size), secret) for _ in range(n)]

    return make


@pytest.fixture
def open_cache(
    mounts: Mounts,
) -> Iterator[Callable[[os.PathLike[str] | str], SiteCache]]:
    """Open SiteCaches that are closed at teardown (closing twice is harmless).

    Depends on ``mounts`` so that caches are closed before anything is unmounted.
    """
    opened: list[SiteCache] = []

    def opener(path: os.PathLike[str] | str) -> SiteCache:
        c = SiteCache(path)
        opened.append(c)
        return c

    yield opener
    for c in reversed(opened):
        with contextlib.suppress(Exception):  # already closed by the test
            c.close()


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def _unmount(path: Path) -> None:
    for _ in range(20):
        if (
            subprocess.run(
                ["umount", str(path)], capture_output=True, check=False
            ).returncode
            == 0
        ):
            return
        gc.collect()  # an unreachable SiteCache may still hold a descriptor
    subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


class Mounts:
    """Make tmpfs and bind mounts; all are undone by the fixture's teardown."""

    def __init__(self) -> None:
        self.stack: list[Path] = []

    def tmpfs(self, where: Path, options: str = "size=3m") -> Path:
        where.mkdir(parents=True, exist_ok=True)
        _run("mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where))
        self.stack.append(where)
        return where

    def bind_readonly(self, src: Path, where: Path) -> Path:
        """Bind ``src`` at ``where`` (may be ``src`` itself) and make that mount read-only."""
        where.mkdir(parents=True, exist_ok=True)
        _run("mount", "--bind", str(src), str(where))
        self.stack.append(where)
        _run("mount", "-o", "remount,bind,ro", str(where))
        return where

    def remount(self, where: Path, options: str) -> None:
        _run("mount", "-o", f"remount,{options}", str(where))

    def unmount(self, where: Path) -> None:
        """Undo the most recent mount at ``where`` now (before teardown)."""
        idx = max(i for i, p in enumerate(self.stack) if p == where)
        self.stack.pop(idx)
        _unmount(where)

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
