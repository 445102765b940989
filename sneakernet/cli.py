"""The `sneakernet` command: prepare and inspect media that carry parcels between sites.

Thin: parse, call :mod:`sneakernet.medium`, :mod:`~sneakernet.indexer` and
:mod:`~sneakernet.known`, render with rich (or ``--json`` for scripts).
sneakernet reaches isrsync only through the Source protocol and the error tree
(:mod:`isrsync.errors`), never through isrsync's CLI, so it has its own small
runner: an :class:`~isrsync.errors.IsrError` becomes one line on stderr (and,
with ``--json``, a JSON object on stdout) and its exit code, a traceback only
with ``--debug`` (or ``ISRSYNC_DEBUG=1``). The exit codes are isrsync's (see
``man sneakernet``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Column, Table

from isrsync.errors import IsrError

from . import known
from . import medium as md
from .indexer import IndexReport

PROG = "sneakernet"
DEBUG_ENV = "ISRSYNC_DEBUG"

app = typer.Typer(
    name=PROG,
    help="Prepare and inspect USB keys and directories that carry isrsync parcels.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_out = Console(highlight=False)
_err = Console(stderr=True, highlight=False)


@dataclass
class _State:
    cache_dir: str | None = None


_state = _State()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON (errors too).")]


def version() -> str:
    # sneakernet ships in the isrsync distribution: one version for both commands.
    try:
        return metadata.version("isrsync")
    except metadata.PackageNotFoundError:
        return "unknown"


def _version(value: bool) -> None:
    if value:
        print(f"{PROG} {version()}")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def root(
    ctx: typer.Context,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar=DEBUG_ENV, help="Show tracebacks on errors.", show_envvar=True),
    ] = False,
    cache_dir: Annotated[
        str | None,
        typer.Option("--cache-dir", envvar=known.ENV_CACHE, help="Site cache directory.", show_envvar=True),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state.cache_dir = cache_dir
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())


# -- rendering --------------------------------------------------------------------------


def _emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= size:
            return f"{s / size:.0f} {unit} ago"
    return "just now"


def _parcels(rec: known.KnownMedium) -> str:
    if not rec.parcels:
        return "-"
    return ", ".join(f"{p.parcel[:8]} v{_versions(p.versions)}" for p in rec.parcels)


def _versions(vs: tuple[int, ...]) -> str:
    return f"{vs[0]}" if len(vs) == 1 else f"{vs[0]}..{vs[-1]}" if vs == tuple(range(vs[0], vs[-1] + 1)) else ",".join(
        map(str, vs))


def _cache() -> Path:
    return known.default_cache_dir(_state.cache_dir)


def _remember(rec: known.KnownMedium) -> None:
    # The medium itself is fine whatever happens here: a site that cannot
    # keep the record only forgets the medium in `sneakernet ls`.
    try:
        known.note_seen(_cache(), rec)
    except IsrError as e:
        _warn_unrecorded(str(e))


def _warn_unrecorded(why: str) -> None:
    _err.print(f"{PROG}: warning: cannot record the medium in the site cache: {why}", markup=False, soft_wrap=True)


class _IndexProgress:
    """Bytes, rate and time left on stderr, shown only once an index has run a second."""

    def __init__(self, enabled: bool, label: str = "indexing") -> None:
        self.label = label
        self.enabled = enabled and _err.is_terminal
        self.t0 = time.monotonic()
        self.bar: Progress | None = None
        self.task = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if not self.enabled or time.monotonic() - self.t0 < 1.0:
                return
            self.bar = Progress(TextColumn(self.label), BarColumn(), DownloadColumn(binary_units=True),
                                TransferSpeedColumn(), TimeRemainingColumn(), console=_err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task("index", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


# -- commands ---------------------------------------------------------------------------


@app.command("format")
def format_cmd(
    path: Annotated[Path, typer.Argument(help="The mount point of the medium, or any writable directory.")],
    label: Annotated[str, typer.Option("--label", "-l", help="A name for people (at most 255 bytes).")] = "",
    json_out: JsonOpt = False,
) -> None:
    """Prepare a medium: create .isrsync/ with a new medium id and an empty index."""
    m = md.format_medium(path, label)
    rec = known.describe(m.root, m.index_file, m.header, chunks=0, chunk_bytes=0, parcels=[])
    _remember(rec)
    if json_out:
        _emit_json({"medium": rec.to_json()})
        return
    named = f" ({m.label})" if m.label else ""
    _out.print(f"formatted {m.root} as medium {m.medium_id}{named}; "
               f"`isrsync suspend --to-usb {m.root}` writes a parcel to it", markup=False, soft_wrap=True)


@app.command("index")
def index_cmd(
    path: Annotated[Path, typer.Argument(help="A medium or any tree: a USB key, a DVD or ISO mount, NFS, a directory.")],
    index_dir: Annotated[Path | None, typer.Option(
        "--index-dir", help="Keep the index here instead of on the medium "
        "(default: on a writable medium; else in the site cache's media/ directory).")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Index a medium or any tree: every pack entry and one-chunk file whose bytes match its tag.

    Incremental: only files whose size or mtime changed are read again.
    """
    progress = _IndexProgress(not json_out)
    try:
        done = known.index_and_remember(path, _cache(), index_dir=index_dir, progress=progress)
    finally:
        progress.close()
    if done.record_error:
        _warn_unrecorded(done.record_error)
    if json_out:
        _emit_json({"index": _report_json(done.report), "medium": done.medium.to_json()})
        return
    _show_index(done.report, done.medium)


def _report_json(r: IndexReport) -> dict:
    d = dict(r.__dict__)
    d["root"], d["index_file"], d["medium_id"] = str(r.root), str(r.index_file), str(r.medium_id)
    return d


def _show_index(r: IndexReport, rec: known.KnownMedium) -> None:
    who = (f"medium {rec.medium_id}" + (f" \"{rec.label}\"" if rec.label else "")) if rec.medium_id else "a tree"
    lines = [
        (f"indexed {r.root} ({who}): {r.chunks} chunks, {_bytes(r.chunk_bytes)}, "
         f"in {r.packs} packs and {r.chunk_files} one-chunk files"),
        (f"read {r.rehashed} of {r.files} files ({_bytes(r.hashed_bytes)} hashed) in {r.seconds:.1f} s; "
         f"{r.kept} unchanged"),
        f"index: {r.index_file}",
    ]
    if r.bad_entries:
        lines.append(f"{r.bad_entries} pack entries did not match their tag and were left out")
    if r.unreadable:
        lines.append(f"{r.unreadable} files or directories could not be read (they are retried next time)")
    if r.previous_problem and r.previous_problem != "not indexed yet":
        lines.append(f"the previous index was not used: {r.previous_problem}")
    for p in rec.parcels:
        lines.append(f"carries parcel {p.parcel} version {_versions(p.versions)}")
    for line in lines:
        _out.print(line, markup=False, soft_wrap=True)


@app.command("seed")
def seed_cmd(
    image: Annotated[Path, typer.Argument(help="A raw, ISO or qcow2 image file: a base image, a DVD's image.")],
    force: Annotated[bool, typer.Option("--force", help="Read the image again even if it looks unchanged.")] = False,
    forget: Annotated[bool, typer.Option("--forget", help="Stop using the image as a seed (drops its index).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Make an image file you have in the clear a lookaside source for your parcels.

    Its 128 KiB chunks are encoded with your convergence secret (log in first
    with `isrsync login`), so wherever a parcel's disk still equals the image a
    resume reads the chunk here instead of over the network. The index goes in
    the site cache; the image is only read.
    """
    from .seed import forget_seed, seed_image

    if forget:
        gone = forget_seed(_cache(), image)
        if json_out:
            _emit_json({"forgotten": gone, "path": str(image)})
        else:
            _out.print(f"{image} is no longer a seed" if gone else f"{image} was not a seed here",
                       markup=False, soft_wrap=True)
        return
    from isrsync.site.media import session_secret

    secret = session_secret()
    progress = _IndexProgress(not json_out, "seeding")
    try:
        rep = seed_image(image, _cache(), secret, progress, force=force)
    finally:
        progress.close()
    if json_out:
        _emit_json({"seed": rep.to_json()})
        return
    share = rep.chunk_bytes / rep.virtual_size if rep.virtual_size else 0.0
    lines = [f"{rep.path} ({rep.kind.label}, {_bytes(rep.virtual_size)}): serves {rep.chunks} chunks, "
             f"{_bytes(rep.chunk_bytes)} ({share:.0%} of the image)"]
    if rep.up_to_date:
        lines.append("unchanged since it was seeded: nothing read (--force reads it again)")
    else:
        lines.append(f"read {_bytes(rep.read_bytes)} in {rep.seconds:.1f} s; {rep.zero_chunks} all-zero chunks "
                     "need no seed")
    if rep.absent_chunks:
        lines.append(f"{rep.absent_chunks} chunks are compressed or in a backing file and are not served")
    lines.append(f"index: {rep.index_file}; resumes and hoards at this site now look here first")
    for line in lines:
        _out.print(line, markup=False, soft_wrap=True)


@app.command("seeds")
def seeds_cmd(json_out: JsonOpt = False) -> None:
    """List the plaintext seeds of this site and whether each can serve now."""
    from .seed import known_seeds

    seeds = known_seeds(_cache(), _secret_or_none())
    if json_out:
        _emit_json([s.to_json() for s in seeds])
        return
    if not seeds:
        _out.print("no seeds at this site; `sneakernet seed IMAGE` makes one", markup=False, soft_wrap=True)
        return
    t = Table(Column("image", overflow="fold", ratio=1), "kind", "size", "serves", "seeded", "status")
    for s in seeds:
        t.add_row(s.path, s.kind, _bytes(s.virtual_size), f"{s.chunks} ({_bytes(s.chunk_bytes)})",
                  _ago(s.seeded) if s.seeded else "-", s.status)
    _out.print(t)


def _secret_or_none() -> bytes | None:
    # Listing works logged out; only the "other user" status needs the secret.
    from isrsync.site.media import session_secret

    try:
        return session_secret()
    except IsrError:
        return None


@app.command("ls")
def ls_cmd(json_out: JsonOpt = False) -> None:
    """List the media this site has seen: ids, sizes, the parcels they can help, when last seen."""
    media = known.known_media(_cache())
    if json_out:
        _emit_json([m.to_json() for m in media])
        return
    if not media:
        _out.print("no media seen at this site yet; `sneakernet index PATH` indexes one "
                   "(`sneakernet format PATH` prepares a new one)", markup=False, soft_wrap=True)
        return
    t = Table("medium", "label", Column("path", overflow="fold", ratio=1), "size", "chunks", "parcels", "last seen")
    for m in media:
        t.add_row(m.medium_id[:8] if m.medium_id else f"({m.key[:8]})", m.label or "-", m.path,
                  _bytes(m.capacity) if m.capacity else "-", f"{m.chunks} ({_bytes(m.chunk_bytes)})",
                  _parcels(m), _ago(m.last_seen))
    _out.print(t)


def error_line(message: str) -> None:
    # Messages carry paths and names: never let rich read them as markup.
    _err.print(f"[bold red]{PROG}:[/] {escape(message)}", markup=True, soft_wrap=True)


def error_json(e: IsrError) -> None:
    _emit_json({"error": {"type": type(e).__name__, "message": e.message, "hint": e.hint,
                          "exit_code": e.exit_code, "details": e.details}})


def run(argv: list[str] | None = None) -> int:
    """Entry point of `sneakernet`: errors become one clear line and an exit code.

    With ``argv`` (tests) the code is returned; without, the process exits with it.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    code = _run(args, debug="--debug" in args or os.environ.get(DEBUG_ENV) == "1")
    if argv is None:
        sys.exit(code)
    return code


def _run(args: list[str], *, debug: bool) -> int:
    try:
        result = app(args=args, prog_name=PROG, standalone_mode=False)
        return result if type(result) is int else 0
    except IsrError as e:
        if debug:
            traceback.print_exc()
        error_line(str(e))
        if "--json" in args:
            error_json(e)
        return e.exit_code
    except KeyboardInterrupt:
        error_line("interrupted")
        return 130
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        error_line("aborted")
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence
        # Click usage errors (bad option, missing argument) know how to show themselves.
        show, code = getattr(e, "show", None), getattr(e, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        if debug:
            traceback.print_exc()
        error_line(f"internal error: {e.__class__.__name__}: {e}; rerun with --debug and report it")
        return 70


# ----------------------------------------------------------------------------
# Media as they are plugged in: install-udev, attach, detach, watch.
# The logic lives in sneakernet.udev, sneakernet.attach and sneakernet.watch;
# they are imported inside each command so `sneakernet --version` stays quick
# and does not need libudev.
# ----------------------------------------------------------------------------

_MediaDir = Annotated[
    Path | None,
    typer.Option("--media-dir", help="Where to mount media [default: media/ in the site's runtime directory]."),
]
_Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of a line of text.")]


def _media_dir(given: Path | None) -> Path:
    from .mounts import default_media_dir

    return given if given is not None else default_media_dir()


def _report(event: str, device: Any, devnode: str, as_json: bool) -> None:
    from .attach import describe

    if as_json:
        print(json.dumps({"event": event, "devnode": devnode,
                          "medium": device.to_json() if device is not None else None}), flush=True)
    elif device is not None:
        print(describe(event, device), flush=True)
    else:
        print(f"{event}: nothing to do for {devnode}", flush=True)


@app.command("install-udev")
def install_udev(
    prefix: Annotated[
        Path | None, typer.Option("--prefix", help="Install under this root instead of / (packaging, tests); reloads nothing.")
    ] = None,
    uninstall: Annotated[bool, typer.Option("--uninstall", help="Remove the rule and the unit.")] = False,
) -> None:
    """Install the udev rule and systemd unit that attach a medium when it is plugged in."""
    from .udev import install

    report = install(prefix, uninstall=uninstall)
    for path in report.written:
        print(f"wrote {path}")
    for path in report.removed:
        print(f"removed {path}")
    for command in report.reloaded:
        print(f"ran {command}")


@app.command("attach")
def attach_cmd(
    devnode: Annotated[str, typer.Argument(help="The block device, e.g. /dev/sdb1.")],
    media_dir: _MediaDir = None,
    offer_any: Annotated[bool, typer.Option("--any", help="Attach any filesystem, not only media with .isrsync/.")] = False,
    as_json: _Json = False,
) -> None:
    """Mount the filesystem on DEVNODE read-only (or find its mount) and offer the medium on it."""
    from .attach import attach

    _report("attached", attach(devnode, _media_dir(media_dir), offer_any=offer_any), devnode, as_json)


@app.command("detach")
def detach_cmd(
    devnode: Annotated[str, typer.Argument(help="The block device given to attach.")],
    media_dir: _MediaDir = None,
    as_json: _Json = False,
) -> None:
    """Withdraw the medium attached from DEVNODE and unmount it if sneakernet mounted it."""
    from .attach import detach

    _report("detached", detach(devnode, _media_dir(media_dir)), devnode, as_json)


@app.command("watch")
def watch_cmd(
    media_dir: _MediaDir = None,
    offer_any: Annotated[bool, typer.Option("--any", help="Offer any filesystem, not only media with .isrsync/.")] = False,
    only: Annotated[
        list[str] | None, typer.Option("--only", metavar="PATTERN", help="Watch only device nodes matching this shell pattern (repeatable).")
    ] = None,
    as_json: _Json = False,
) -> None:
    """Attach media as they appear and detach them as they go, until interrupted (no udev rule needed)."""
    import asyncio

    from .attach import HOOKS
    from .watch import devnode_filter, serve

    def emit(event: str, device: Any) -> None:
        _report(event, device, device.devnode, as_json)

    accept = devnode_filter(only or [])
    asyncio.run(serve(_media_dir(media_dir), emit, hooks=HOOKS, offer_any=offer_any, accept=accept))


if __name__ == "__main__":
    run()
