"""Running the home server: listen (optionally TLS), log, collect garbage, stop gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from aiohttp import web

from ..errors import UsageError
from .repo import Repository
from .app import ACTIVE, JsonAccessLogger, make_app
from .maint import collect_garbage

log = logging.getLogger("isrsync.server")
GC_INTERVAL = 3600.0


@dataclass
class ServeConfig:
    data: Path
    host: str = "127.0.0.1"
    port: int = 8470
    tls_cert: Path | None = None
    tls_key: Path | None = None
    gc_interval: float = GC_INTERVAL


def parse_listen(spec: str) -> tuple[str, int]:
    host, sep, port = spec.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise UsageError(f"--listen {spec!r} is not HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise UsageError(f"cannot load the TLS certificate {cert} or key {key}: {e}") from None
    return ctx


async def serve(cfg: ServeConfig, on_ready: Callable[[str, int], None] | None = None) -> None:
    """Serve until SIGTERM/SIGINT; then finish in-flight commits and exit."""
    if (cfg.tls_cert is None) != (cfg.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    repo = Repository(cfg.data, create=True)  # a fresh directory becomes a new home
    app = make_app(repo)
    runner = web.AppRunner(app, access_log_class=JsonAccessLogger, access_log=logging.getLogger("isrsync.access"),
                           shutdown_timeout=120)
    await runner.setup()
    ctx = tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
    site = web.TCPSite(runner, cfg.host, cfg.port, ssl_context=ctx, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        repo.close()
        raise UsageError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    host, port = sock.getsockname()[:2]
    log.info("serving %s on %s:%d%s", cfg.data, host, port, " (TLS)" if ctx else "")
    if on_ready:
        on_ready(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc_task = asyncio.create_task(_gc_loop(repo, cfg.gc_interval))
    try:
        await stop.wait()
    finally:
        gc_task.cancel()
        log.info("shutting down: finishing in-flight requests")
        # Stop accepting, then let every request already started finish (a
        # body may still be arriving), then close what is left.
        await site.stop()
        active = [t for t in app[ACTIVE] if not t.done()]
        if active:
            await asyncio.wait(active, timeout=120)
        await runner.cleanup()
        repo.close()


async def _gc_loop(repo: Repository, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            n = await asyncio.to_thread(collect_garbage, repo)
            if n:
                log.info("garbage collection removed %d stale upload(s)/pack(s)", n)
        except Exception:  # noqa: BLE001 - GC must never take the server down
            log.exception("garbage collection failed")
