"""Fault-injection sweep (issue 15): how fast, and how correctly, every other rank learns
of a failure, on both CPU transports and both schedules, 4 ranks.

Per transport (``auto``: shared memory on this host; ``group``: the private gloo
group) and schedule (DualPipe, DualPipeV), the cases of ``tests/fault_inject.py``:

* **SIGSTOP** of each rank 0..3 inside a forward of step 1 (``timeout=3`` s): every
  other rank must raise ``PipelineTimeout`` within timeout + 2 s naming it;
* **runtime-raised errors** (a criterion returning ``None`` on rank 0, and on rank 3
  for DualPipe; a stage output changing shape on ranks 1 and 2): every rank within
  2 s, ``failed_rank`` the raising rank;
* **constructor failures** (ranks asking for different transports; one rank never
  building the pipeline);
* **SIGKILL** of a random rank at a random moment of a training loop, ``--seeds``
  seeds (``timeout=30`` s): every survivor within 2 s naming it, all at the same step.

Written per case: detection latency (fault to raise, host clock) min/median/max over
the survivors, whether each got the right type, ``failed_rank`` and a message naming
the rank, the steps the SIGKILL survivors failed at (a *split*: survivors disagreeing),
and the ``/dev/shm/dualpipe-*`` files the case left.  No pytest needed::

    python -m bench.fault_sweep --seeds 20 --out bench/results/fault_sweep.json
    python -m bench.fault_sweep --seeds 2 --transports group --schedules dualpipe
    python -m bench.fault_sweep --plan            # list the cases, run nothing

``--out``: a ``.json`` path (the markdown table goes next to it, ``.md``) or a
directory (``fault_sweep.json``/``.md`` in it; default ``bench/results``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

from bench.machine import describe_machine, machine_info
from bench.report import md_table, out_dir, write_json


def _stats(xs) -> dict | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return {"min": xs[0], "median": statistics.median(xs), "max": xs[-1], "n": len(xs)}


def _fmt(st: dict | None) -> str:
    if st is None:
        return "-"
    return f"{st['min']:.2f} / {st['median']:.2f} / {st['max']:.2f}"


def _target(case: dict):
    return case.get("victim", case.get("raiser"))


def case_row(case: dict) -> dict:
    """The numbers of one case (SIGSTOP, runtime error, constructor or SIGKILL run)."""
    rows = case.get("survivors") or case.get("ranks") or []
    raised = [w for w in rows if w.get("raised")]
    target = _target(case)
    lat = [w.get("latency", w.get("took")) for w in raised]
    out = {"kind": case["kind"], "transport": case["transport"],
           "schedule": case["schedule"], "target": target, "survivors": len(rows),
           "raised": len(raised), "latency_s": _stats(lat),
           "per_survivor": {w["rank"]: {"type": w.get("type"),
                                        "latency_s": w.get("latency", w.get("took")),
                                        "failed_rank": w.get("failed_rank"),
                                        "named": w.get("named")} for w in rows},
           "violations": len(case["violations"])}
    if "failed_rank" in (rows[0] if rows else {}):
        out["failed_rank_ok"] = sum(w.get("failed_rank") == target for w in raised)
        out["named_ok"] = sum(bool(w.get("named")) for w in raised)
    if case["kind"] == "stop":
        out["timeout_type_ok"] = sum(bool(w.get("timeout")) for w in raised)
    if case["kind"] == "sigkill":
        out.update(seed=case["seed"], split=case["split"], failed_steps=case["failed_steps"],
                   kill_step=case.get("kill_step"), kill_phase=case.get("kill_phase"))
    out["files_left"] = case.get("files_left", [])
    return out


def summarize(cases: list[dict]) -> list[dict]:
    """Aggregate the SIGKILL runs per (transport, schedule); other cases stay one row each."""
    rows, kills = [], {}
    for c in cases:
        r = case_row(c)
        if c["kind"] == "sigkill":
            kills.setdefault((c["transport"], c["schedule"]), []).append(r)
        else:
            rows.append(r)
    for (tr, sch), runs in kills.items():
        lat = [w["latency_s"] for r in runs for w in r["per_survivor"].values()]
        rows.append({"kind": "sigkill", "transport": tr, "schedule": sch, "runs": len(runs),
                     "seeds": [r["seed"] for r in runs],
                     "victim0_runs": sum(r["target"] == 0 for r in runs),
                     "latency_s": _stats(lat),
                     "worst_run_max_s": max((r["latency_s"]["max"] for r in runs
                                             if r["latency_s"]), default=None),
                     "splits": sum(bool(r["split"]) for r in runs),
                     "survivors": sum(r["survivors"] for r in runs),
                     "raised": sum(r["raised"] for r in runs),
                     "failed_rank_ok": sum(r.get("failed_rank_ok", 0) for r in runs),
                     "named_ok": sum(r.get("named_ok", 0) for r in runs),
                     "files_left": sorted({f for r in runs for f in r["files_left"]}),
                     "violations": sum(r["violations"] for r in runs)})
    return rows


def markdown(rows: list[dict], machine: dict, cmd: str) -> str:
    head = ["case", "transport", "schedule", "rank", "raised", "latency s min / med / max",
            "type ok", "failed_rank ok", "named", "splits", "files left", "violations"]
    table = []
    for r in rows:
        kind = r["kind"]
        n = r["survivors"]
        if kind == "sigkill":
            rank = f"random ({r['runs']} seeds, {r['victim0_runs']} of rank 0)"
            type_ok = "-"
        else:
            rank = str(r["target"])
            type_ok = f"{r['timeout_type_ok']}/{n}" if kind == "stop" else "-"
        table.append([kind, r["transport"], r["schedule"], rank, f"{r['raised']}/{n}",
                      _fmt(r["latency_s"]), type_ok,
                      f"{r['failed_rank_ok']}/{n}" if "failed_rank_ok" in r else "-",
                      f"{r['named_ok']}/{n}" if "named_ok" in r else "-",
                      str(r.get("splits", "-")), str(len(r["files_left"])),
                      str(r["violations"])])
    return "\n".join([
        "# Fault injection (`python -m bench.fault_sweep`)", "",
        f"Machine: {describe_machine(machine)}.", "", f"Command: `{cmd}`", "",
        "4 ranks, gloo. Latency: from the fault (SIGSTOP / SIGKILL / the runtime's raise; "
        "host clock) to each other rank's exception. Promises (issue 15): SIGSTOP -> "
        "PipelineTimeout within timeout (3 s) + 2 s naming the frozen rank; SIGKILL and "
        "runtime-raised errors -> within 2 s naming the rank, no split; no file left in "
        "/dev/shm. Constructor rows: latency = time the constructor took. Files left "
        "are counted per spawn (the non-SIGKILL cases of one transport x schedule share "
        "one), so each of those rows shows its spawn's.", "",
        md_table(head, table), ""])


def plan(transports, schedules, seeds, kinds) -> list[tuple]:
    from tests import fault_inject as fi
    out = []
    for tr in transports:
        for sch in schedules:
            if kinds & {"stop", "raise", "ctor"}:
                cases = []
                if "raise" in kinds:
                    cases += [fi.raise_case("no_loss", sch, 0), fi.raise_case("shape", sch, 1),
                              fi.raise_case("shape", sch, 2)]
                    if sch == "dualpipe":
                        cases.append(fi.raise_case("no_loss", sch, 3))
                if "stop" in kinds:
                    cases += [fi.stop_case(sch, v) for v in range(fi.WORLD)]
                if "ctor" in kinds:
                    cases += fi.ctor_cases(sch)
                out.append(("cases", tr, sch, cases))
            if "kill" in kinds:
                out += [("kill", tr, sch, s) for s in fi.default_sigkill_seeds(seeds)]
    return out


def _paths(out: str | None) -> tuple[Path, Path]:
    if out and out.endswith(".json"):
        p = Path(out)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p, p.with_suffix(".md")
    d = out_dir(out)
    return d / "fault_sweep.json", d / "fault_sweep.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fault_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=20, help="SIGKILL seeds per transport x "
                   "schedule (at least one kills rank 0)")
    p.add_argument("--transports", nargs="+", default=["auto", "group"],
                   choices=["auto", "group"])
    p.add_argument("--schedules", nargs="+", default=["dualpipe", "dualpipev"],
                   choices=["dualpipe", "dualpipev"])
    p.add_argument("--kinds", nargs="+", default=["stop", "raise", "ctor", "kill"],
                   choices=["stop", "raise", "ctor", "kill"])
    p.add_argument("--plan", action="store_true", help="list the spawns and exit")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.seeds < 1 and "kill" in a.kinds:
        raise SystemExit("--seeds must be >= 1 (or leave 'kill' out of --kinds)")
    todo = plan(a.transports, a.schedules, a.seeds, set(a.kinds))
    if a.plan:
        for job in todo:
            what = (f"{len(job[3])} cases: " + ", ".join(
                f"{c['kind']}@{c.get('victim', c.get('raiser'))}" for c in job[3])
                    if job[0] == "cases" else f"SIGKILL seed {job[3]}")
            print(f"{job[1]:5s} {job[2]:9s} {what}")
        return 0
    from tests import fault_inject as fi
    json_path, md_path = _paths(a.out)
    machine = machine_info("gloo", threads_per_rank=1)
    t0 = time.perf_counter()
    cases, spawns = [], []
    for i, job in enumerate(todo):
        t = time.perf_counter()
        if job[0] == "cases":
            run = fi.run_cases(job[1], job[3])
            for c in run["cases"]:
                c["files_left"] = run["files_left"]  # per spawn: the cases share it
            cases += run["cases"]
            spawns.append({"transport": job[1], "schedule": job[2], "wall_s": run["wall_s"],
                           "rank_errors": run["rank_errors"],
                           "violations": run["violations"]})
            lines = [fi.describe(c) for c in run["cases"]]
        else:
            out = fi.run_sigkill(job[1], job[2], job[3])
            cases.append(out)
            lines = [fi.describe(out)]
        for line in lines:
            print(f"[fault_sweep {i + 1}/{len(todo)}, {time.perf_counter() - t:.0f} s] {line}",
                  flush=True)
    rows = summarize(cases)
    cmd = "python -m bench.fault_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
    machine["load_avg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(json_path, {
        "benchmark": "fault_sweep", "machine": machine, "command": cmd,
        "config": {"seeds": a.seeds, "transports": a.transports, "schedules": a.schedules,
                   "kinds": a.kinds, "stop_timeout_s": fi.STOP_TIMEOUT,
                   "kill_timeout_s": fi.KILL_TIMEOUT, "raise_timeout_s": fi.RAISE_TIMEOUT,
                   "ctor_timeout_s": fi.CTOR_TIMEOUT, "bound_s": fi.BOUND},
        "units": "seconds", "wall_s": time.perf_counter() - t0, "summary": rows,
        "violations": [v for c in cases for v in c["violations"]]
                      + [v for s in spawns for v in s["violations"]
                         if not any(v in c["violations"] for c in cases)],
        "spawns": spawns, "cases": cases})
    md = markdown(rows, machine, cmd)
    md_path.write_text(md)
    print(md)
    print(f"[fault_sweep] wrote {json_path}, {md_path.name} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
