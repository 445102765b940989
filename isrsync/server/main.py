"""Running the home server: listen (optionally TLS), log, collect garbage, stop gracefully."""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aiohttp import web

from ..errors import UsageError
from ..longlived import settle
from .pg import describe
from .repo import Repository
from .app import ACTIVE, JsonAccessLogger, make_app
from . import redact
from .limits import ConnectionGate, Limits
from .maint import collect_garbage, sweep_partials

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
    limits: Limits = field(default_factory=Limits)
    #: postgresql://… for the rows; None: store.db in ``data``
    metadata: str | None = None
    #: s3://… for the packs; None: packs/ in ``data``
    packs: str | None = None


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
    redact.install()  # before the first request can be logged
    # A fresh directory becomes a new home. Opening a PostgreSQL pool blocks,
    # but nothing is being served yet.
    repo = Repository(cfg.data, create=True, metadata=cfg.metadata, packs=cfg.packs)
    app = make_app(repo, cfg.limits)
    # auto_decompress=False: a request body is never inflated (a small gzip body
    # could otherwise become hundreds of MiB); the app refuses encoded bodies.
    # aiohttp's keep-alive timer runs from accept to a complete request head,
    # so it is the header timeout as well as the idle one.
    runner = web.AppRunner(app, access_log_class=JsonAccessLogger, access_log=logging.getLogger("isrsync.access"),
                           shutdown_timeout=120, auto_decompress=False,
                           keepalive_timeout=cfg.limits.header_timeout)
    await runner.setup()
    ctx = tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
    assert runner.server is not None
    gate = ConnectionGate(runner.server, cfg.limits.max_connections, cfg.limits.header_timeout)
    loop = asyncio.get_running_loop()
    try:
        listener = await loop.create_server(gate, cfg.host, cfg.port, ssl=ctx, reuse_address=True,
                                            ssl_handshake_timeout=cfg.limits.header_timeout if ctx else None)
    except OSError as e:
        await runner.cleanup()
        repo.close()
        raise UsageError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    host, port = listener.sockets[0].getsockname()[:2]
    where = str(cfg.data) if cfg.metadata is None else f"{cfg.data} with {describe(cfg.metadata)}"
    if cfg.packs is not None:
        where += f", packs in {getattr(repo.packs, 'where', 's3')}"
    log.info("serving %s on %s:%d%s", where, host, port, " (TLS)" if ctx else "")
    settle()  # before the first request: later collections skip the process's start-up objects
    if on_ready:
        on_ready(host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gc_task = asyncio.create_task(_gc_loop(repo, cfg.gc_interval))
    sweep_task = asyncio.create_task(_sweep_loop(repo, cfg.limits.partial_idle))
    try:
        await stop.wait()
    finally:
        gc_task.cancel()
        sweep_task.cancel()
        log.info("shutting down: finishing in-flight requests")
        # Stop accepting, then let every request already started finish (a
        # body may still be arriving), then close what is left.
        listener.close()
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


async def _sweep_loop(repo: Repository, idle: float) -> None:
    # Checking a few times per bound keeps a dead client's partial at most
    # about 1.25 x ``idle`` on disk.
    while True:
        await asyncio.sleep(min(60.0, idle / 4))
        try:
            n = await asyncio.to_thread(sweep_partials, repo, idle)
            if n:
                log.info("dropped %d partial upload(s) idle for over %.0f s", n, idle)
        except Exception:  # noqa: BLE001 - a sweep must never take the server down
            log.exception("sweeping partial uploads failed")
