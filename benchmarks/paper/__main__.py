"""Reproduce the paper's evaluation: resume latency and slowdown per transfer policy and link rate.

    python -m benchmarks.paper                                # 100 and 10 Mb/s, every policy, Debian guest
    python -m benchmarks.paper --rates 100mbit,10mbit,1mbit,100kbit --max-seconds 1800
    python -m benchmarks.paper --guest busybox --memory-mib 96 --rates 100kbit --policies demand,auto \
        --full-size docs/evaluation/results.json --out docs/evaluation/100kbit   # scaled down for 100 Kb/s
    python -m benchmarks.paper --rates 10mbit --policies demand,auto,jukebox --repeat 3 --once jukebox   # medians of 3
    python -m benchmarks.paper --guest busybox --ops 6 --rates 100mbit --out /tmp/smoke   # the CI smoke size
    python -m benchmarks.paper --report-from docs/evaluation/results.json   # the report again, nothing run

Writes ``results.json`` (every figure and its inputs), ``report.md`` and the
PNG plots into ``--out`` (default docs/evaluation); a ``notes.md`` there is
included in the report, and subdirectories holding a report are linked. Needs
root (network namespaces, tc), qemu-system-x86_64, mkfs.ext4, debootstrap (installed with
apt-get when missing) and matplotlib. See benchmarks/paper/run.py for what is
measured. Exit status 0 whether or not a target is met: this is a
measurement, not a test; 1 with one line when it could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from . import report
from .guest import MEMORY_MIB
from .run import POLICIES, RATES, Hooks, Settings, experiment

REPO = Path(__file__).resolve().parent.parent.parent


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.paper", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", default="100mbit,10mbit", help=f"comma-separated subset of {','.join(RATES)}")
    ap.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated subset of {','.join(POLICIES)}")
    ap.add_argument("--guest", choices=("debian", "busybox"), default="debian",
                    help="debian: the evaluation guest (built once, cached); busybox: the test guest (smoke test)")
    ap.add_argument("--ops", type=int, default=100, help="workload operations per run (default 100)")
    ap.add_argument("--think-ms", type=int, default=500, help="think time after each operation (default 500 ms)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of each rate x policy (the report gives medians and the count)")
    ap.add_argument("--once", default="", help="comma-separated policies run in the first repeat only (long ones)")
    ap.add_argument("--seed", type=int, default=1, help="the workload's seed (same operations in every run)")
    ap.add_argument("--max-seconds", type=float, default=900.0,
                    help="do not run a policy whose whole-state transfer is estimated longer than this")
    ap.add_argument("--disk-mib", type=int, default=None,
                    help="guest disk size (default 2048 for debian, 64 for busybox)")
    ap.add_argument("--guest-cache", type=Path, default=Path("/var/cache/isrsync-eval"),
                    help="where the Debian guest is built once and kept")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "evaluation", help="where results and plots go")
    ap.add_argument("--report-from", type=Path, default=None,
                    help="make the report and plots again from a saved results.json (nothing is run)")
    ap.add_argument("--json", action="store_true", help="print results.json on stdout too (progress on stderr)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--memory-mib", type=int, default=MEMORY_MIB, help=f"guest RAM (default {MEMORY_MIB}, the paper's)")
    ap.add_argument("--full-size", type=Path, default=None,
                    help="results.json of the full-size run this one is scaled down from (a smaller guest for the "
                         "slow rates): the scale is this memory image's size over that one's, and the paper's "
                         "figures beside it are scaled by the same factor")
    ap.add_argument("--debug", action="store_true", help="a traceback instead of one line when a run fails")
    a = ap.parse_args(argv)
    a.rates = [r.strip() for r in a.rates.split(",") if r.strip()]
    a.policies = [p.strip() for p in a.policies.split(",") if p.strip()]
    bad = [r for r in a.rates if r not in RATES] + [p for p in a.policies if p not in POLICIES]
    if bad:
        ap.error(f"unknown rate or policy {bad}; rates: {','.join(RATES)}; policies: {','.join(POLICIES)}")
    if a.ops < 1 or a.repeat < 1:
        ap.error("--ops and --repeat must be >= 1")
    if not 32 <= a.memory_mib <= MEMORY_MIB:
        ap.error(f"--memory-mib must be between 32 and {MEMORY_MIB} (the paper's guest)")
    full = None
    if a.full_size is not None:
        try:
            full = int(json.loads(a.full_size.read_text())["state"]["memory_bytes"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            ap.error(f"--full-size {a.full_size}: not a results.json this harness wrote ({e})")
    busybox_cache = Path(os.environ.get("ISRSYNC_TEST_GUEST_CACHE", REPO / ".pytest_cache" / "d" / "isrsync-guest"))
    s = Settings(rates=a.rates, policies=a.policies, flavour=a.guest, ops=a.ops, think_ms=a.think_ms, seed=a.seed,
                 max_seconds=a.max_seconds, disk_mib=a.disk_mib or (2048 if a.guest == "debian" else 64),
                 guest_cache=a.guest_cache, busybox_cache=busybox_cache, repeat=a.repeat,
                 once=[p.strip() for p in a.once.split(",") if p.strip()], memory_mib=a.memory_mib,
                 full_memory_bytes=full)
    return a, s


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    a, s = parse(argv)
    console = Console(stderr=True)
    if a.report_from is not None:
        try:
            res = json.loads(a.report_from.read_text())
        except (OSError, ValueError) as e:
            console.print(f"error: cannot read {a.report_from}: {e}; give a results.json this command wrote")
            return 1
        res.pop("figures", None)
        write(res, a.out)
        console.print(f"report and plots made again in {a.out}")
        return 0
    if os.geteuid() != 0:
        console.print("error: needs root (it makes a network namespace and shapes a veth with tc); run it with sudo")
        return 1
    from benchmarks.usb_resume import _isolate

    from .testbed import Testbed

    work = Path(tempfile.mkdtemp(prefix="isr-paper-", dir="/tmp"))  # short: unix socket paths
    _isolate(work)
    # No LAN peer helps a run unless it is the jukebox run (which turns the swarm on for itself).
    os.environ["ISRSYNC_SWARM"] = "off"
    bed = Testbed()
    servers: list = []
    runs_total = 1 + len(s.rates) * len(s.policies) * s.repeat
    started = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=False) as prog:
        t_runs = prog.add_task("runs (reference + rate x policy)", total=runs_total)
        t_ops = prog.add_task("workload operations", total=s.ops)
        t_stage = prog.add_task("starting", total=None)

        def say(m: str) -> None:
            prog.console.print(f"[dim]{m}[/]", markup=True, highlight=False)

        def stage(m: str) -> None:
            prog.update(t_stage, description=m)
            if m.endswith("workload"):
                prog.reset(t_ops, total=s.ops)

        hooks = Hooks(say=say, stage=stage, op=lambda o: prog.advance(t_ops),
                      done_run=lambda: prog.advance(t_runs))
        try:
            bed.up()
            res = asyncio.run(experiment(work, s, bed, servers, hooks))
        except KeyboardInterrupt:
            console.print("interrupted; cleaning up")
            return 1
        except Exception as e:
            if a.debug:
                raise
            console.print(f"error: the evaluation stopped: {type(e).__name__}: {e}; --keep --debug keeps the "
                          f"work directory (server log, serial files) and shows where", markup=False)
            return 1
        finally:
            for srv in servers:
                with contextlib.suppress(Exception):
                    srv.stop()
                    srv.kill()
            bed.down()
            if a.keep:
                say(f"work directory kept: {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.perf_counter() - started, 1)
    res["loadavg"] = os.getloadavg()
    write(res, a.out)
    console.print(f"results, report and plots in {a.out} ({res['seconds']:.0f}s)")
    if a.json:
        print(json.dumps(res, indent=1, default=str))
    return 0


def write(res: dict, out: Path) -> None:
    """results.json, the plots and report.md from one experiment's results."""
    out.mkdir(parents=True, exist_ok=True)
    fig = report.figures(res)
    res["figures"] = fig
    (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
    made = report.plots(res, fig, out)
    md = report.markdown(res, fig, made)
    notes = out / "notes.md"
    if notes.exists():
        # What the numbers mean, written by whoever ran it (findings, causes): kept across regenerations.
        md += "\n## Notes on these figures\n\n" + notes.read_text()
    earlier = sorted(d.name for d in out.iterdir() if d.is_dir() and (d / "report.md").exists())
    if earlier:
        # Runs made with other settings (rates, sizes, code) keep their own report beside this one.
        md += "\n## Other runs, each with its own reference and settings\n\n" + "\n".join(
            f"- [{d}/report.md]({d}/report.md)" for d in earlier) + "\n"
    (out / "report.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
