"""`isrsync serve` and `isrsync server ...`: run and administer a home server."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from ..server.app import default_data_dir
from ..server.limits import Limits
from ..server.main import ServeConfig, parse_listen, serve
from ..server.maint import check, collect_garbage, prune
from ..server.repo import Repository
from ..store.names import check_user_name
from .render import emit_json, human_bytes, out
from .state import JsonOpt

app = typer.Typer(help="Administer a home server's data directory.", no_args_is_help=True)

DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", envvar="ISRSYNC_SERVER_DATA", help="Server data directory.", show_envvar=True),
]


MetaOpt = Annotated[
    Optional[str],
    typer.Option("--metadata", envvar="ISRSYNC_SERVER_METADATA", show_envvar=True,
                 help="postgresql://… address of the metadata database (users, parcels, locks, pack index); "
                      "packs stay in --data. Default: store.db in --data."),
]


PacksOpt = Annotated[
    Optional[str],
    typer.Option("--packs", envvar="ISRSYNC_SERVER_PACKS", show_envvar=True,
                 help="s3://BUCKET[/PREFIX][?endpoint=URL&region=R] for the packs (credentials from AWS_* "
                      "variables); partial uploads stay in --data. Default: packs/ in --data."),
]


def _repo(data: Path | None, metadata: str | None = None, packs: str | None = None, *,
          create: bool = False) -> Repository:
    # Only add-user makes a data directory; every other command needs one that exists.
    return Repository(data or default_data_dir(), create=create, metadata=metadata, packs=packs)


def serve_cmd(
    data: DataOpt = None,
    metadata: MetaOpt = None,
    packs: PacksOpt = None,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on (port 0: any free port).")] = "127.0.0.1:8470",
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="PEM certificate chain for HTTPS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="PEM private key for HTTPS.")] = None,
    max_connections: Annotated[int, typer.Option(
        "--max-connections", min=1, help="Open connections at most; past it, idle ones are closed or 503.")] = 512,
    header_timeout: Annotated[float, typer.Option(
        "--header-timeout", min=0.01, help="Seconds a connection may take to send a request's headers.")] = 30.0,
    body_timeout: Annotated[float, typer.Option(
        "--body-timeout", min=0.01, help="Seconds a request body may pause before it is dropped.")] = 60.0,
    uploads_per_user: Annotated[int, typer.Option(
        "--uploads-per-user", min=1, help="Pack uploads one user may have in progress at once.")] = 8,
    partials_per_user: Annotated[int, typer.Option(
        "--partials-per-user", min=1, help="Unfinished uploads kept per user; the oldest go first.")] = 32,
    partial_idle: Annotated[float, typer.Option(
        "--partial-idle", min=0.1, help="Seconds an unfinished upload is kept after its last byte, for its "
                                        "client to resume it.")] = 600.0,
) -> None:
    """Run the home server until SIGTERM or Ctrl-C.

    A data directory that holds no server data yet becomes a new, empty home.

    Prints one JSON line with the address it listens on when it is ready;
    access log lines (JSON) go to stderr.
    """
    host, port = parse_listen(listen)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    limits = Limits(max_connections, header_timeout, body_timeout, uploads_per_user, partials_per_user, partial_idle)
    cfg = ServeConfig(data or default_data_dir(), host, port, tls_cert, tls_key, limits=limits,
                      metadata=metadata, packs=packs)

    def ready(h: str, p: int) -> None:
        scheme = "https" if tls_cert else "http"
        print(json.dumps({"listening": f"{scheme}://{h}:{p}", "data": str(cfg.data)}), flush=True)

    asyncio.run(serve(cfg, ready))


@app.command("add-user")
def add_user(name: str, data: DataOpt = None, metadata: MetaOpt = None, packs: PacksOpt = None, json_out: JsonOpt = False) -> None:
    """Create a user and print their bearer token (shown only once).

    Creates the data directory too if it holds no server data yet.
    """
    check_user_name(name)  # a refused name leaves no new, empty data directory behind
    repo = _repo(data, metadata, packs, create=True)
    try:
        token = repo.add_user(name)
    finally:
        repo.close()
    if json_out:
        emit_json({"user": name, "token": token})
    else:
        out.print(f"user {name} created; token (store it now, it is not kept):")
        print(token)


@app.command("remove-user")
def remove_user(name: str, data: DataOpt = None, metadata: MetaOpt = None, packs: PacksOpt = None) -> None:
    """Delete a user and all their parcels' records."""
    repo = _repo(data, metadata, packs)
    try:
        repo.remove_user(name)
    finally:
        repo.close()
    out.print(f"user {name} removed")


@app.command("list-users")
def list_users(data: DataOpt = None, metadata: MetaOpt = None, packs: PacksOpt = None, json_out: JsonOpt = False) -> None:
    """List users and how many parcels each has."""
    repo = _repo(data, metadata, packs)
    try:
        rows = repo.list_users()
    finally:
        repo.close()
    if json_out:
        emit_json([{"user": n, "created": c, "parcels": k} for n, c, k in rows])
        return
    t = Table("user", "created", "parcels")
    for n, c, k in rows:
        t.add_row(n, time.strftime("%Y-%m-%d %H:%M", time.localtime(c)), str(k))
    out.print(t)
    if not rows:
        out.print("no users yet; add one with `isrsync server add-user NAME`")


@app.command("check")
def check_cmd(
    data: DataOpt = None,
    metadata: MetaOpt = None,
    packs: PacksOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Skip hashing every pack.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Verify every pack against its id and every version's references."""
    repo = _repo(data, metadata, packs)
    try:
        rep = check(repo, verify_packs=not quick)
    finally:
        repo.close()
    if json_out:
        emit_json({"packs": rep.packs, "versions": rep.versions, "problems": rep.problems, "ok": rep.ok})
    else:
        for p in rep.problems:
            out.print(f"problem: {p}")
        out.print(f"checked {rep.packs} packs and {rep.versions} versions: "
                  + ("all good" if rep.ok else f"{len(rep.problems)} problem(s)"))
    if not rep.ok:
        raise typer.Exit(3)


@app.command("prune")
def prune_cmd(
    user: Annotated[str, typer.Argument(help="Owner of the parcel.")],
    parcel: Annotated[str, typer.Argument(help="Parcel name or id.")],
    keep: Annotated[int, typer.Option("--keep", min=1, help="How many newest versions to keep.")],
    data: DataOpt = None,
    metadata: MetaOpt = None,
    packs: PacksOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Drop old versions and compact packs whose live fraction is low."""
    repo = _repo(data, metadata, packs)
    try:
        info = repo.parcel(user, parcel)
        rep = prune(repo, user, info.parcel, keep)
        gc = collect_garbage(repo)
    finally:
        repo.close()
    if json_out:
        emit_json({**rep.__dict__, "collected": gc})
        return
    out.print(
        f"kept versions from {rep.kept_from}; dropped {rep.versions_dropped} version(s), "
        f"{rep.packs_dropped} dead pack(s), compacted {rep.packs_compacted}; freed {human_bytes(rep.bytes_freed)}"
    )


@app.command("migrate")
def migrate_cmd(
    metadata: Annotated[str, typer.Option(
        "--metadata", envvar="ISRSYNC_SERVER_METADATA", show_envvar=True,
        help="postgresql://… address of the metadata database to bring up to this isrsync's schema.")],
    json_out: JsonOpt = False,
) -> None:
    """Create or upgrade the isrsync schema in a PostgreSQL metadata database.

    Applies each missing numbered migration in its own transaction; running it
    again does nothing. Fronts refuse a database whose schema is not current.
    """
    from ..server import pg

    applied = pg.migrate(metadata)
    if json_out:
        emit_json({"applied": applied, "schema": pg.SCHEMA_VERSION})
    elif applied:
        out.print(f"{pg.describe(metadata)}: applied migration(s) {', '.join(map(str, applied))}; "
                  f"schema {pg.SCHEMA_VERSION}")
    else:
        out.print(f"{pg.describe(metadata)}: schema {pg.SCHEMA_VERSION} is current; nothing to do")


def _copy(src: Repository, dst: Repository, json_out: bool) -> dict:
    from ..server.transfer import check_empty, copy_repository, describe
    from .bars import transfer_progress

    check_empty(dst)  # refused before any progress shows
    with transfer_progress(json_out) as prog:
        task = prog.add_task("copying and verifying packs", total=None)

        def tell(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        rep = copy_repository(src, dst, tell)
    summary = {**rep.__dict__, "from": describe(src), "to": describe(dst), "verified": True}
    if json_out:
        emit_json(summary)
    else:
        out.print(f"copied {rep.users} user(s), {rep.parcels} parcel(s), {rep.versions} version(s) and "
                  f"{rep.packs} pack(s) ({human_bytes(rep.bytes)}, every one verified) from {summary['from']} "
                  f"to {summary['to']} in {rep.seconds:.1f} s", markup=False, highlight=False, soft_wrap=True)
    return summary


@app.command("export")
def export_cmd(
    dest: Annotated[Path, typer.Argument(help="A new data directory to receive the copy (store.db and packs/).")],
    data: DataOpt = None,
    metadata: MetaOpt = None,
    packs: PacksOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy this server's whole repository into a new data directory, verifying every pack.

    With --metadata and --packs this moves a PostgreSQL and S3 repository back
    to the embedded directory form; `isrsync server import` goes the other way.
    The destination must hold no repository yet; on any error it is left as it was.
    """
    src = _repo(data, metadata, packs)
    try:
        dst = Repository(dest, create=True)
        try:
            _copy(src, dst, json_out)
        finally:
            dst.close()
    finally:
        src.close()


@app.command("import")
def import_cmd(
    source: Annotated[Path, typer.Argument(help="The data directory (store.db and packs/) to copy in.")],
    data: DataOpt = None,
    metadata: MetaOpt = None,
    packs: PacksOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy a whole repository from a data directory into this server, verifying every pack.

    With --metadata and --packs this moves a directory repository into
    PostgreSQL and S3 (run `isrsync server migrate` first). This server must
    hold no repository yet; on any error it is left as it was.
    """
    src = Repository(source)
    try:
        dst = _repo(data, metadata, packs, create=True)
        try:
            _copy(src, dst, json_out)
        finally:
            dst.close()
    finally:
        src.close()
