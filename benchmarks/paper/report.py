"""The figures from an experiment's JSON: tables beside the paper's, targets, markdown, PNG plots.

Everything here is computed from the JSON :func:`benchmarks.paper.run.experiment`
returns, so a report can be made again from a saved ``results.json``.

The paper's figures at hand (Satyanarayanan et al., "Towards seamless mobility
on pervasive hardware", 2005), in seconds at full size: Table 3 (baseline
resume) at 100 Mb/s only, 2504 s for about 4.3 GB; Table 6 (pure demand-fetch
resume latency) and Table 10 (with the memory image on a USB key) at the four
rates, as benchmarks/usb_resume.py carries them. The figures of Tables 4, 5, 7,
8, 11 and 12 are not at hand: their cells say so rather than show a number.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

RATE_BPS = {"100mbit": 100e6, "10mbit": 10e6, "1mbit": 1e6, "100kbit": 100e3}
RATE_LABEL = {"100mbit": "100 Mb/s", "10mbit": "10 Mb/s", "1mbit": "1 Mb/s", "100kbit": "100 Kb/s"}
PAPER_STATE_BYTES = 4.3e9  # the paper's baseline moved about 4.3 GB
PAPER_RESUME: dict[str, dict[str, float]] = {
    "baseline": {"100mbit": 2504.0},  # Table 3
    "demand": {"100mbit": 14.0, "10mbit": 39.0, "1mbit": 317.0, "100kbit": 4301.0},  # Table 6
    "usb": {"100mbit": 13.0, "10mbit": 12.0, "1mbit": 12.0, "100kbit": 12.0},  # Table 10
}
PAPER_TABLE = {"baseline": "3", "proactive": "5", "demand": "6", "usb": "10", "dvd": "-", "jukebox": "-",
               "auto": "-"}
BENCH_TABLE = {"baseline": "4", "demand": "7, 8", "dvd": "11", "jukebox": "12"}
LABEL = {"baseline": "baseline", "proactive": "fully proactive", "demand": "pure demand-fetch",
         "usb": "demand + memory image on USB", "dvd": "DVD lookaside", "jukebox": "jukebox lookaside",
         "auto": "isrsync auto"}


def paper_resume(policy: str, rate: str, scale: float = 1.0) -> float | None:
    v = PAPER_RESUME.get(policy, {}).get(rate)
    return None if v is None else v * scale


def op_ratios(run: dict[str, Any], ref: dict[str, Any]) -> list[float]:
    """Each operation's time over the reference's time for the same operation."""
    refs = {o["index"]: o["seconds"] for o in ref["ops"]}
    return [o["seconds"] / max(refs[o["index"]], 1e-4) for o in run["ops"] if o["index"] in refs]


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _median_fields(ds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each numeric field's median over the runs (nested dicts too); None where no run has it."""
    out: dict[str, Any] = {}
    for k in ds[0]:
        vs = [d.get(k) for d in ds]
        if isinstance(vs[0], dict):
            out[k] = _median_fields([v for v in vs if isinstance(v, dict)])
        else:
            out[k] = _median([v for v in vs if isinstance(v, (int, float))])
    return out


def scale_of(res: dict[str, Any]) -> float:
    """This run's memory image over the full-size run's it stands for (1.0 if it stands for itself).

    The paper's demand-fetch resume moved the whole memory image before the guest ran
    (41 MB at 1 Mb/s: 317 s; at 100 Kb/s: 4301 s), so that is what its figures scale with.
    """
    full = res["settings"].get("full_memory_bytes")
    return res["state"]["memory_bytes"] / full if full else 1.0


def _row(runs: list[dict[str, Any]], ref: dict[str, Any], floor: float, state_bytes: int,
         scale: float = 1.0) -> dict[str, Any]:
    """One (policy, rate) cell from its repeats: medians, their count and every repeat's value."""
    r0 = runs[0]
    row: dict[str, Any] = {"policy": r0["policy"], "rate": r0["rate"], "scale": scale,
                           "repeats": len(runs)}
    rate = RATE_BPS[r0["rate"]]
    res_s = [r["resume_seconds"] for r in runs]
    slow = [r["busy_seconds"] / ref["busy_seconds"] for r in runs]
    row["resume_seconds"] = _median(res_s)
    row["resume_seconds_each"] = res_s
    row["slowdown"] = _median(slow)
    row["slowdown_each"] = slow
    row["busy_seconds"] = _median([r["busy_seconds"] for r in runs])
    ratios = [x for r in runs for x in op_ratios(r, ref)]  # pooled over the repeats
    row["op_slowdown_median"] = statistics.median(ratios) if ratios else None
    row["op_slowdown_p90"] = sorted(ratios)[int(0.9 * (len(ratios) - 1))] if ratios else None
    resume_bytes = _median([r["resume_pack_bytes"] for r in runs]) or 0
    row["resume_pack_bytes"] = resume_bytes
    row["pack_bytes"] = _median([r["pack_bytes"] for r in runs])
    lan = [next((x["bytes"] for x in r.get("sources", []) if x.get("name") == "lan"), 0) for r in runs]
    if r0["policy"] == "jukebox":
        row["lan_bytes"] = _median(lan)
    answers = [r["at_answer"] for r in runs if "at_answer" in r]
    if answers:
        row["at_answer"] = _median_fields(answers)
    p = paper_resume(r0["policy"], r0["rate"], row["scale"])
    row["paper_resume"] = p
    row["ratio_to_paper"] = row["resume_seconds"] / p if p else None
    if r0["policy"] == "baseline":
        full = paper_resume("baseline", r0["rate"])  # scaled to our state here, not by the memory image
        row["paper_resume_at_our_state"] = full * state_bytes / PAPER_STATE_BYTES if full else None
        uses = [r["resume_pack_bytes"] * 8 / r["resume_steps"]["fetch_before_start"] / rate for r in runs
                if (r["resume_steps"].get("fetch_before_start") or 0) > 0]
        row["link_use"] = _median(uses)
        row["target"] = ("baseline moves the state at >= 90% of the link rate", row["link_use"] is not None
                         and row["link_use"] >= 0.9)
    elif r0["policy"] == "demand":
        bound = 1.1 * resume_bytes * 8 / rate + floor
        row["bound"] = bound
        row["target"] = (f"resume <= 1.1 x (bytes before the guest answers / rate) + floor = {bound:.2f}s",
                         row["resume_seconds"] <= bound)
    elif r0["policy"] in ("usb", "proactive"):
        row["target"] = (f"resume <= 1.2 x the local restore floor ({1.2 * floor:.2f}s)",
                         row["resume_seconds"] <= 1.2 * floor)
    if r0["policy"] == "proactive":
        row["hoard_seconds"] = _median([r.get("hoard_seconds") or 0.0 for r in runs])
        row["travel_seconds"] = _median([(r.get("hoard_seconds") or 0.0) + r["resume_seconds"] for r in runs])
    row["dirty_chunks_at_suspend"] = _median([r["suspend"]["dirty_chunks"] for r in runs])
    if all("residue" in r for r in runs):
        row["residue_without_trickle"] = _median([r["residue"]["without_trickle_chunks"] for r in runs])
        row["residue_with_trickle"] = _median([r["residue"]["with_trickle_chunks"] for r in runs])
    return row


def figures(res: dict[str, Any]) -> dict[str, Any]:
    """Derived figures per (policy, rate), medians over repeats: latency, slowdown, ratios to the paper, targets."""
    ref = res["reference"]
    floor = ref["answer_seconds"]
    rows = []
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in res["runs"]:
        cells.setdefault((r["policy"], r["rate"]), []).append(r)
    for (policy, rate), runs in cells.items():
        if any("not_run" in r for r in runs):
            rows.append({"policy": policy, "rate": rate, "scale": scale_of(res), "repeats": 0,
                         "not_run": next(r["not_run"] for r in runs if "not_run" in r)})
            continue
        rows.append(_row(runs, ref, floor, res["state"]["bytes"], scale_of(res)))
    by = {(x["policy"], x["rate"]): x for x in rows}
    for rate in ("10mbit", "1mbit"):
        a, d = by.get(("auto", rate)), by.get(("demand", rate))
        if a and d and "slowdown" in a and "slowdown" in d:
            extra_a, extra_d = a["slowdown"] - 1, d["slowdown"] - 1
            a["target"] = (f"auto's extra time <= half of pure demand's ({extra_d:.2f} / 2)",
                           extra_a <= extra_d / 2)
    return {"floor_seconds": floor, "rows": rows}


def _note(notes: list[str], text: str) -> str:
    """A numbered note for a long reason, the same number for the same text."""
    if text not in notes:
        notes.append(text)
    return f"note {notes.index(text) + 1}"


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(res: dict[str, Any], fig: dict[str, Any], plots: list[str]) -> str:
    s, st, ref = res["settings"], res["state"], res["reference"]
    rates = s["rates"]
    by = {(x["policy"], x["rate"]): x for x in fig["rows"]}
    L: list[str] = []
    L.append("# isrsync against the paper: resume latency and slowdown per transfer policy\n")
    L.append(f"Guest: {res['guest']['flavour']} ({res['guest'].get('recipe', '')}), {s.get('memory_mib', 256)} MiB RAM, "
             f"{res['guest']['disk_mib']} MiB disk; accelerator {res['accel']} (no usable KVM means an emulated "
             f"CPU: every guest-side time is TCG's). Workload: {s['ops']} operations, seed {s['seed']}, think "
             f"time {s['think_ms']} ms, times taken {ref['timed_in']}-side.\n")
    L.append(f"State of the resumed version: memory image {st['memory_bytes'] / 1e6:.1f} MB, disk's stored "
             f"chunks {st['disk_bytes'] / 1e6:.1f} MB (before compression), {st['bytes'] / 1e6:.1f} MB in all; "
             f"the USB medium holds {st['medium_bytes'] / 1e6:.1f} MB.\n")
    netem = "present but not used" if res["link"]["netem"] else \
        "absent on this kernel (no sch_netem): the link has a rate and no added delay (the paper added 10 ms at " \
        "1 Mb/s and 100 ms at 100 Kb/s)"
    bed = res["link"].get("testbed")
    where = (f"the home server and the sites (A makes the parcel, B resumes it, J is the jukebox) each in a "
             f"network namespace of its own on one bridge ({', '.join(f'{h} {a}' for h, a in bed['hosts'].items())}); "
             f"shaped: {bed['shaped']}") if bed else \
        "the home server in a network namespace behind a veth pair; the sites in the root namespace"
    L.append(f"Link: {where}; `tc tbf` per rate ({'; '.join(f'{r}: rate/burst/latency {v}' for r, v in res['link']['tbf'].items())}); netem "
             f"{netem}.\n")
    reps = s.get("repeat", 1)
    once = s.get("once") or []
    L.append(f"Repeats: {reps} run(s) of each rate x policy" + (f" ({', '.join(once)}: 1 run)" if once else "") +
             "; each cell is the median over its runs, with the count (n) beside it; per-operation slowdowns are "
             "pooled over the runs. One reference run (below) is every run's denominator.\n")
    load = res.get("loadavg")
    L.append("Load: measured on a 2-core machine shared with other work (other sessions' builds and VM tests)"
             + (f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}" if load else "")
             + ". Differences of some tens of percent between runs of the same cell are this noise.\n")
    scale = scale_of(res)
    if scale == 1.0:
        L.append("Scaling: none. Every figure below is at full size (scale 1.0, printed per cell as x1), and so is "
                 "the paper's beside it; a run that would take longer than --max-seconds is not run and says so.\n")
    else:
        full = s.get("full_memory_bytes")
        L.append(f"Scaling: the state is scaled down to fit the slow link: this run's memory image is "
                 f"{st['memory_bytes'] / 1e6:.1f} MB against {full / 1e6:.1f} MB in the full-size run it stands for "
                 f"(--full-size), scale x{scale:.3f}, printed per cell. The paper's resume figure beside each "
                 f"cell is scaled by the same factor: its demand-fetch resume moved the whole memory image before "
                 f"the guest ran. A run that would take longer than --max-seconds is not run and says so.\n")
    notes: list[str] = []
    L.append("## Resume latency (seconds until the guest's agent answers)\n")
    L.append("| policy | paper table | " + " | ".join(f"{RATE_LABEL[r]}: ours / paper / ratio" for r in rates) + " |")
    L.append("|---|---|" + "---|" * len(rates))
    for p in s["policies"]:
        cells = []
        for r in rates:
            x = by.get((p, r))
            if x is None:
                cells.append("-")
            elif "not_run" in x:
                cells.append(f"not run ({_note(notes, x['not_run'])})")
            else:
                paper = x["paper_resume"]
                cells.append(f"{x['resume_seconds']:.2f} (n={x['repeats']}, x{x['scale']:.3g}) / "
                             f"{_f(paper, '{:.0f}') if paper else 'not at hand'}"
                             f" / {_f(x['ratio_to_paper'], '{:.3f}')}")
        L.append(f"| {LABEL[p]} | {PAPER_TABLE[p]} | " + " | ".join(cells) + " |")
    L.append("")
    L += [f"{k + 1}. {n}" for k, n in enumerate(notes)]
    L.append("")
    L.append("## Benchmark time and slowdown (sum of the operations' times, over the reference's)\n")
    L.append("| policy | paper table | " + " | ".join(
        f"{RATE_LABEL[r]}: seconds / slowdown / per-op median, p90" for r in rates) + " |")
    L.append("|---|---|" + "---|" * len(rates))
    L.append(f"| reference (local raw disk) | - | " + " | ".join(
        f"{ref['busy_seconds']:.1f} / 1.00 / 1.00" for _ in rates) + " |")
    for p in s["policies"]:
        cells = []
        for r in rates:
            x = by.get((p, r))
            if x is None:
                cells.append("-")
            elif "not_run" in x:
                cells.append(f"not run ({_note(notes, x['not_run'])})")
            else:
                each = ", ".join(f"{v:.2f}" for v in x["slowdown_each"])
                cells.append(f"{x['busy_seconds']:.1f} / {x['slowdown']:.2f} (n={x['repeats']}: {each}) / "
                             f"{_f(x['op_slowdown_median'])}, {_f(x['op_slowdown_p90'])}")
        L.append(f"| {LABEL[p]} | {BENCH_TABLE.get(p, '-')} | " + " | ".join(cells) + " |")
    for x in fig["rows"]:
        if x["policy"] == "jukebox" and "lan_bytes" in x:
            L.append(f"\nJukebox at {RATE_LABEL[x['rate']]}: {x['lan_bytes'] / 1e6:.1f} MB came from the LAN peer, "
                     f"{x['pack_bytes'] / 1e6:.1f} MB from the server (medians).")
    L.append("\nThe paper's benchmark times and slowdowns (Tables 4, 7, 8, 11, 12) are not at hand: no ratio is "
             "printed for them.\n")

    L += slow_links(by, rates)
    L.append("## Suspend side\n")
    L.append("| policy | rate | dirty residue, chunks: without trickle / with trickle | proactive: hoard (t3) s "
             "| travel t3 + resume s |")
    L.append("|---|---|---|---|---|")
    for x in fig["rows"]:
        if "not_run" in x:
            continue
        residue = (f"{_f(x['residue_without_trickle'], '{:.0f}')} / {_f(x['residue_with_trickle'], '{:.0f}')}"
                   if "residue_without_trickle" in x else f"- / {x['dirty_chunks_at_suspend']}")
        L.append(f"| {LABEL[x['policy']]} | {x['rate']} | {residue} | "
                 f"{_f(x.get('hoard_seconds'))} | {_f(x.get('travel_seconds'))} |")
    L.append("\nBoth residues come from each run, read just before its suspend (128 KiB chunks; medians): "
             "without trickle, a suspend uploads every chunk the guest wrote since the resume; with trickle "
             "(isrsync's default: it starts 30 s after the guest settles), only those not yet staged on the "
             "server or written again since. The memory image is uploaded at every suspend either way.\n")

    L.append("## Targets\n")
    for x in fig["rows"]:
        if "target" in x:
            what, ok = x["target"]
            L.append(f"- {LABEL[x['policy']]} at {RATE_LABEL[x['rate']]}: {what}: "
                     f"**{'met' if ok else 'missed'}** (measured {x.get('resume_seconds', 0):.2f}s resume, "
                     f"slowdown {_f(x.get('slowdown'))}{', link use ' + _f(x.get('link_use'), '{:.3f}') if 'link_use' in x else ''})")
    for x in fig["rows"]:
        if x["policy"] == "baseline" and x.get("paper_resume_at_our_state"):
            L.append(f"- baseline at {RATE_LABEL[x['rate']]}: the paper's 2504 s scaled to our state size "
                     f"({st['bytes'] / 1e6:.0f} MB of {PAPER_STATE_BYTES / 1e9:.1f} GB) is "
                     f"{x['paper_resume_at_our_state']:.0f}s; ours {x['resume_seconds']:.1f}s")
    L.append("")
    for p in plots:
        L.append(f"![{p}]({p})\n")
    return "\n".join(L)


def slow_links(by: dict[tuple[str, str], dict[str, Any]], rates: list[str]) -> list[str]:
    """Issue 15's table: up to the guest's first answer, per rate, for demand and auto."""
    rows = [(r, p, x) for r in rates for p in ("demand", "auto") if "at_answer" in (x := by.get((p, r), {}))]
    if not rows:
        return []
    L = ["## Up to the guest's first answer: bytes, waste and fault service (issue 15)\n",
         "Medians over the runs. Bytes before the answer: pack bytes the server sent from the resume's start to "
         "the guest's first answer (its access log). Wasted: fetched more than once, or fetched and thrown away "
         "(the registry's count; target < 2 % of what was fetched). Faults: the post-copy page requests' service "
         "times, and the disk's demand misses', up to the answer. The fault target is p99 <= 2 x (one 128 KiB "
         "chunk / rate + RTT), checked by benchmarks/slow_links.py on its own; a resume's faults queue behind each "
         "other too.\n",
         "| rate | policy | first answer s (scale) | paper (Table 6) | before the answer MB | wasted MB (%) | late | "
         "memory faults: n, p50 / p99 / max ms | disk misses: n, p50 / p99 / max ms |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r, p, x in rows:
        a, m = x["at_answer"], x["at_answer"]["memory"]
        fetched = a.get("fetched_bytes") or 0
        waste = a.get("wasted_bytes") or 0
        pct = f"{100 * waste / fetched:.2f}" if fetched else "-"
        L.append(f"| {RATE_LABEL[r]} | {LABEL[p]} | {x['resume_seconds']:.1f} (x{x['scale']:.3g}) | "
                 f"{_f(x.get('paper_resume'), '{:.0f}')} | {x['resume_pack_bytes'] / 1e6:.1f} | "
                 f"{waste / 1e6:.2f} ({pct}) | {_f(a.get('late'), '{:.0f}')} | "
                 f"{_f(m.get('requests'), '{:.0f}')}, {_f(m.get('fault_ms_median'), '{:.0f}')} / "
                 f"{_f(m.get('fault_ms_p99'), '{:.0f}')} / {_f(m.get('fault_ms_max'), '{:.0f}')} | "
                 f"{_f(a.get('disk_misses'), '{:.0f}')}, {_f(a.get('disk_miss_ms_median'), '{:.0f}')} / "
                 f"{_f(a.get('disk_miss_ms_p99'), '{:.0f}')} / {_f(a.get('disk_miss_ms_max'), '{:.0f}')} |")
    L.append("")
    return L


def plots(res: dict[str, Any], fig: dict[str, Any], outdir: Path) -> list[str]:
    """resume-latency.png (latency against rate, per policy, the paper's dashed) and slowdown-cdf.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r for r in RATE_BPS if r in res["settings"]["rates"]]
    made = []
    figr, ax = plt.subplots(figsize=(7, 4.5))
    for i, p in enumerate(res["settings"]["policies"]):
        pts = [(RATE_BPS[x["rate"]] / 1e6, x["resume_seconds"]) for x in fig["rows"]
               if x["policy"] == p and "resume_seconds" in x]
        color = f"C{i}"
        if pts:
            ax.plot(*zip(*sorted(pts)), "o-", color=color, label=f"{LABEL[p]} (ours)")
        paper = [(RATE_BPS[r] / 1e6, v) for r, v in PAPER_RESUME.get(p, {}).items()]
        if paper:
            ax.plot(*zip(*sorted(paper)), "s--", color=color, alpha=0.6, label=f"{LABEL[p]} (paper)")
    ax.axhline(fig["floor_seconds"], color="grey", lw=0.8, ls=":", label="local restore floor")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("link rate (Mb/s)")
    ax.set_ylabel("resume latency (s)")
    ax.set_title("Resume latency per policy")
    ax.legend(fontsize=7)
    figr.tight_layout()
    figr.savefig(outdir / "resume-latency.png", dpi=110)
    plt.close(figr)
    made.append("resume-latency.png")

    figc, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4), squeeze=False)
    for ax, r in zip(axes[0], rates):
        for i, p in enumerate(res["settings"]["policies"]):
            run = next((u for u in res["runs"] if u["policy"] == p and u["rate"] == r and "ops" in u), None)
            if run is None:
                continue
            xs = sorted(op_ratios(run, res["reference"]))
            ys = [(k + 1) / len(xs) for k in range(len(xs))]
            ax.step(xs, ys, where="post", color=f"C{i}", label=LABEL[p])
        ax.set_xscale("log")
        ax.set_xlabel("operation time / reference's")
        ax.set_ylabel("fraction of operations")
        ax.set_title(f"Per-operation slowdown, {RATE_LABEL[r]}")
        ax.legend(fontsize=7)
    figc.tight_layout()
    figc.savefig(outdir / "slowdown-cdf.png", dpi=110)
    plt.close(figc)
    made.append("slowdown-cdf.png")
    return made
