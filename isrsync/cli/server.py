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
from ..server.main import ServeConfig, parse_listen, serve
from ..server.maint import check, collect_garbage, prune
from ..server.repo import Repository, check_user_name
from .render import emit_json, human_bytes, out
from .state import JsonOpt

app = typer.Typer(help="Administer a home server's data directory.", no_args_is_help=True)

DataOpt = Annotated[
    Optional[Path],
    typer.Option("--data", envvar="ISRSYNC_SERVER_DATA", help="Server data directory.", show_envvar=True),
]


def _repo(data: Path | None, *, create: bool = False) -> Repository:
    # Only add-user makes a data directory; every other command needs one that exists.
    return Repository(data or default_data_dir(), create=create)


def serve_cmd(
    data: DataOpt = None,
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on (port 0: any free port).")] = "127.0.0.1:8470",
    tls_cert: Annotated[Optional[Path], typer.Option("--tls-cert", help="PEM certificate chain for HTTPS.")] = None,
    tls_key: Annotated[Optional[Path], typer.Option("--tls-key", help="PEM private key for HTTPS.")] = None,
) -> None:
    """Run the home server until SIGTERM or Ctrl-C.

    A data directory that holds no server data yet becomes a new, empty home.

    Prints one JSON line with the address it listens on when it is ready;
    access log lines (JSON) go to stderr.
    """
    host, port = parse_listen(listen)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    cfg = ServeConfig(data or default_data_dir(), host, port, tls_cert, tls_key)

    def ready(h: str, p: int) -> None:
        scheme = "https" if tls_cert else "http"
        print(json.dumps({"listening": f"{scheme}://{h}:{p}", "data": str(cfg.data)}), flush=True)

    asyncio.run(serve(cfg, ready))


@app.command("add-user")
def add_user(name: str, data: DataOpt = None, json_out: JsonOpt = False) -> None:
    """Create a user and print their bearer token (shown only once).

    Creates the data directory too if it holds no server data yet.
    """
    check_user_name(name)  # a refused name leaves no new, empty data directory behind
    repo = _repo(data, create=True)
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
def remove_user(name: str, data: DataOpt = None) -> None:
    """Delete a user and all their parcels' records."""
    repo = _repo(data)
    try:
        repo.remove_user(name)
    finally:
        repo.close()
    out.print(f"user {name} removed")


@app.command("list-users")
def list_users(data: DataOpt = None, json_out: JsonOpt = False) -> None:
    """List users and how many parcels each has."""
    repo = _repo(data)
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
    quick: Annotated[bool, typer.Option("--quick", help="Skip hashing every pack.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Verify every pack against its id and every version's references."""
    repo = _repo(data)
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
    json_out: JsonOpt = False,
) -> None:
    """Drop old versions and compact packs whose live fraction is low."""
    repo = _repo(data)
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
