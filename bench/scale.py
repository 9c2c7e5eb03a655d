"""How the schedule tools grow with ranks x micro-batches.

For each registered schedule and each rung of a ladder of (ranks, micro-batches), from
8 x 20 to 128 x 4096 by default, one process times, on schedule objects made afresh:

* ``generate``  the generator (``SCHEDULES[name](ranks, chunks)``, not the cache);
* ``lower``     :func:`dualpipe.schedules.lower` (inserting the sends and receives);
* ``validate``  :func:`dualpipe.validate.validate` (completeness, order, dry run; the
  lowering it reads is already cached on the object);
* ``simulate``  :func:`dualpipe.simulate.simulate` with the default costs;
* ``plan``      the runtime's plan compiler (``dualpipe.runtime.plan.compile_plans``,
  uncached, every rank's plan, the runtime's default lookahead), which also reads
  ``lower()``;
* ``cached``    ``get_schedule`` + ``lower`` once both are cached (what a second
  ``step()`` with the same shape pays): must not grow at all.

Each figure is the median over ``--repeats`` samples of wall-clock seconds
(``time.perf_counter``) and of this process's CPU seconds (``time.process_time``: on a
machine shared with other work, the wall clock also counts the time the process
waited for a core; the CPU time does not).  A sample times each tool over several
fresh schedules when one is small (so a sample is not a few timer ticks); the rungs
of a schedule are interleaved within each repeat, so a change of machine load falls
on all of them alike.  A garbage collection runs before each timed call, not during
it; the collector stays enabled, as in a user's process (the tools pause it
themselves, see ``dualpipe.schedules.gc_paused``).

Per-action time divides by what each tool makes or walks: generate by the compute
actions (an F&B pair is one), simulate by the compute parts (an F&B pair is two),
lower, validate and plan by the lowered actions (compute and communication).  The
growth figure per tool and schedule is the CPU time per action of the largest rung over
the smallest, and the largest over the smallest across the whole ladder (``spread``);
the target is both within 1.5 x.  The 1-minute load average is recorded around each
sample.

    python -m bench.scale                  # 4 schedules x 5 rungs, 5 repeats
    python -m bench.scale --quick          # rungs up to 32 x 256, 2 repeats
    python -m bench.scale --schedules dualpipe --ladder 8x20 64x1024

Writes ``scale.json``, ``scale.md`` and ``scale.png`` under ``bench/results/`` (or
``--out``).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from bench.machine import describe_machine, machine_info
from bench.report import md_table, new_figure, out_dir, save_figure, text_table, write_json
from bench.stats import summarize

LADDER = ((8, 20), (16, 64), (32, 256), (64, 1024), (128, 4096))
QUICK_LADDER = ((8, 20), (16, 64), (32, 256))
TOOLS = ("generate", "lower", "validate", "simulate", "plan")
# what each tool's time is divided by: what it makes or walks
UNIT = {"generate": "compute", "lower": "lowered", "validate": "lowered", "simulate": "parts",
        "plan": "lowered"}
UNIT_TEXT = {"compute": "compute actions", "parts": "compute parts (F&B = 2)",
             "lowered": "lowered actions (with communication)"}
SAMPLE_ACTIONS = 200_000  # lowered actions per timed sample, at least ...
SAMPLE_MAX_SCHEDULES = 100  # ... unless that takes more schedules than this
TARGET = 1.5


def _rung(text: str) -> tuple[int, int]:
    try:
        r, c = text.lower().split("x")
        return int(r), int(c)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a rung is RANKSxCHUNKS, e.g. 8x20; got {text!r}")


def _timed(fn, args_list):
    """``(wall s, cpu s, results)`` of ``fn(*args)`` for each of ``args_list``, after a
    collection."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    out = [fn(*args) for args in args_list]
    return time.perf_counter() - w0, time.process_time() - c0, out


def _inner(name: str, ranks: int, chunks: int) -> int:
    """How many schedules one timed sample covers: enough for ~``SAMPLE_ACTIONS``
    lowered actions (at most ``SAMPLE_MAX_SCHEDULES``), so that a small rung's sample
    is not a few timer ticks."""
    from dualpipe.schedules import SCHEDULES
    lowered = sum(len(a) for a in SCHEDULES[name](ranks, chunks).lowered)
    return max(1, min(SAMPLE_MAX_SCHEDULES, SAMPLE_ACTIONS // lowered))


def sample(name: str, ranks: int, chunks: int, inner: int) -> dict:
    """One timed sample of every tool on ``inner`` fresh schedules; seconds per schedule."""
    from dualpipe.runtime.plan import compile_plans as cached_plans
    from dualpipe.schedules import SCHEDULES, lower
    from dualpipe.simulate import simulate
    from dualpipe.validate import validate
    compile_plans = cached_plans.__wrapped__  # the uncached pass
    lookahead = 2  # PipelineRuntime's default
    wall, cpu = {}, {}
    w, c, scheds = _timed(SCHEDULES[name], [(ranks, chunks)] * inner)
    wall["generate"], cpu["generate"] = w, c
    for tool, fn, extra in (("lower", lower, ()), ("validate", validate, ()),
                            ("simulate", simulate, ()),
                            ("plan", compile_plans, (False, lookahead))):
        w, c, _ = _timed(fn, [(s, *extra) for s in scheds])
        wall[tool], cpu[tool] = w, c
    s = scheds[0]
    counts = {"compute": sum(len(a) for a in s.actions),
              "parts": sum(len(a.parts()) for acts in s.actions for a in acts),
              "lowered": sum(len(a) for a in lower(s))}
    del scheds, s
    return {"wall": {k: v / inner for k, v in wall.items()},
            "cpu": {k: v / inner for k, v in cpu.items()}, "actions": counts}


def cached_lookup_us(name: str, ranks: int, chunks: int) -> float:
    """Median microseconds of ``lower(get_schedule(...))`` once both are cached (what a
    second ``step()`` of the same shape pays)."""
    from dualpipe.schedules import get_schedule, lower
    get_schedule.cache_clear()
    lower(get_schedule(name, ranks, chunks))
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        lower(get_schedule(name, ranks, chunks))
        times.append(time.perf_counter() - t0)
    get_schedule.cache_clear()
    return statistics.median(times) * 1e6


def measure(names, ladder, repeats: int, log=print) -> list[dict]:
    """Every (schedule, rung), ``repeats`` samples each, the rungs of a schedule
    interleaved within each repeat (so a change of machine load falls on all of them
    alike); medians."""
    rows = []
    for name in names:
        inner = {rung: _inner(name, *rung) for rung in ladder}
        samples = {rung: [] for rung in ladder}
        loads = {rung: [] for rung in ladder}
        for rep in range(repeats):
            for rung in ladder:
                l0 = os.getloadavg()[0]
                samples[rung].append(sample(name, *rung, inner[rung]))
                loads[rung].append((l0, os.getloadavg()[0]))
                log(f"[scale] {name} {rung[0]} x {rung[1]} repeat {rep + 1}/{repeats}: "
                    + ", ".join(f"{t} {samples[rung][-1]['wall'][t]:.3g} s" for t in TOOLS)
                    + f" (load {l0:.1f})")
        for rung in ladder:
            ss = samples[rung]
            counts = ss[0]["actions"]
            row = {"schedule": name, "ranks": rung[0], "chunks": rung[1], "actions": counts,
                   "schedules_per_sample": inner[rung], "repeats": repeats,
                   "load_avg_1min": [round(min(x[0] for x in loads[rung]), 2),
                                     round(max(max(x) for x in loads[rung]), 2)],
                   "wall_s": {}, "cpu_s": {}, "wall_us_per_action": {},
                   "cpu_us_per_action": {}, "cpu_us_per_action_min": {},
                   "cached_lookup_us": cached_lookup_us(name, *rung)}
            for tool in TOOLS:
                n = counts[UNIT[tool]]
                for clock in ("wall", "cpu"):
                    stats = summarize([x[clock][tool] for x in ss])
                    row[f"{clock}_s"][tool] = stats
                    row[f"{clock}_us_per_action"][tool] = stats["median"] / n * 1e6
                row["cpu_us_per_action_min"][tool] = row["cpu_s"][tool]["min"] / n * 1e6
            rows.append(row)
    return rows


GROWTH_OF = {"cpu": "cpu_us_per_action", "cpu_min": "cpu_us_per_action_min",
             "wall": "wall_us_per_action"}


def growth(rows: list[dict]) -> dict:
    """Per schedule and tool: per-action time of the largest rung / the smallest
    (``largest_over_smallest``) and max / min over the ladder (``spread``), for the
    median CPU time (``cpu``, the headline), the fastest sample's CPU time
    (``cpu_min``: what is left when the machine's other work is not in the way) and
    the median wall clock."""
    out: dict = {}
    for name in dict.fromkeys(r["schedule"] for r in rows):
        mine = sorted((r for r in rows if r["schedule"] == name),
                      key=lambda r: r["actions"]["lowered"])
        g = out[name] = {}
        for tool in TOOLS:
            g[tool] = {}
            for key, field in GROWTH_OF.items():
                xs = [r[field][tool] for r in mine]
                g[tool][key] = {"largest_over_smallest": xs[-1] / xs[0],
                                "spread": max(xs) / min(xs)}
            g[tool]["within_target"] = all(v <= TARGET for v in g[tool]["cpu"].values())
    return out


def render(cfg: dict, machine: dict, rows: list[dict], grow: dict, out) -> str:
    """Write ``scale.md`` and ``scale.png``; return the tables for the terminal."""
    md = ["# Schedule tools at scale (`python -m bench.scale`)", "",
          f"Machine: {describe_machine(machine)}; load avg at the end "
          f"{machine['load_avg_1_5_15_end'][0]}; commit `{machine['git_commit']}`"
          + (f" with {', '.join(machine['runtime_modified_since_commit'])} modified"
             if machine.get("runtime_modified_since_commit") else "")
          + ".  **The machine is shared with other "
          f"work** ({machine['cpu_cores_usable']} cores; the load column is the lowest "
          "1-minute load average at the start and the highest at the end of a rung's "
          "samples): wall-clock times include waiting for a core, CPU times do not, so "
          "per-action figures and growth use CPU time.", "",
          f"Medians over {cfg['repeats']} repeats; each sample times every tool on "
          "freshly generated schedules (several per sample for small rungs), rungs "
          "interleaved within a repeat, a garbage collection before each timed call.  "
          "`actions`: compute actions (an F&B pair is one) / compute parts (F&B = 2) / "
          "lowered actions (with the sends and receives).  `plan` is the runtime's plan "
          "compiler; `cached` is `get_schedule` + `lower` once both are cached (what a "
          "second step of the same shape pays).", ""]
    h1 = ["schedule", "ranks x chunks", "actions", "load"] + [f"{t} s" for t in TOOLS] + \
        ["cached us"]
    body1 = []
    for r in rows:
        n = r["actions"]
        body1.append([r["schedule"], f"{r['ranks']} x {r['chunks']}",
                      f"{n['compute']} / {n['parts']} / {n['lowered']}",
                      f"{r['load_avg_1min'][0]:.1f} / {r['load_avg_1min'][1]:.1f}"]
                     + [f"{r['wall_s'][t]['median']:.3g}" for t in TOOLS]
                     + [f"{r['cached_lookup_us']:.1f}"])
    md += ["Wall-clock seconds per schedule:", "", md_table(h1, body1), ""]
    h2 = ["schedule", "ranks x chunks"] + [f"{t} (per {UNIT[t]})" for t in TOOLS]
    body2 = [[r["schedule"], f"{r['ranks']} x {r['chunks']}"]
             + [f"{r['cpu_us_per_action'][t]:.2f}" for t in TOOLS] for r in rows]
    md += ["CPU microseconds per action, each tool divided by what it makes or walks "
           "(generate: compute actions; simulate: compute parts; lower, validate, plan: "
           "lowered actions):", "", md_table(h2, body2), ""]
    h3 = ["schedule", "statistic"] + [f"{t}: largest/smallest (spread)" for t in TOOLS]
    body3 = []
    for name, g in grow.items():
        for key, label in (("cpu", "median"), ("cpu_min", "fastest sample")):
            body3.append([name, label]
                         + [f"{g[t][key]['largest_over_smallest']:.2f} "
                            f"({g[t][key]['spread']:.2f})"
                            + ("" if key != "cpu" or g[t]["within_target"] else " **over**")
                            for t in TOOLS])
    md += ["Growth of the CPU time per action: largest rung / smallest rung, and in "
           "brackets the largest / smallest over the whole ladder (`spread`); target <= "
           f"{TARGET} for both, on the medians (**over** marks a miss).  On this shared "
           "machine one sample can take ~1.6x another of the same work (another job on "
           "the same core), so the growth of the fastest sample per rung is shown too.  "
           "Wall-clock growth is in `scale.json`.", "", md_table(h3, body3), "",
           "![per-action time](scale.png)", ""]
    (out / "scale.md").write_text("\n".join(md))
    _plot(machine, rows, out)
    return (text_table(h1, body1) + "\n\n" + text_table(h2, body2) + "\n\n"
            + text_table(h3, body3))


def _plot(machine: dict, rows: list[dict], out) -> None:
    fig, axes = new_figure(len(TOOLS), 3.6, 3.4)
    for ax, tool in zip(axes, TOOLS):
        for name in dict.fromkeys(r["schedule"] for r in rows):
            mine = sorted((r for r in rows if r["schedule"] == name),
                          key=lambda r: r["actions"]["lowered"])
            ax.plot([r["actions"][UNIT[tool]] for r in mine],
                    [r["cpu_us_per_action"][tool] for r in mine], marker="o", label=name)
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel(UNIT_TEXT[UNIT[tool]], fontsize=8)
        ax.set_ylabel("CPU us per action")
        ax.set_title(tool, fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"bench.scale — {describe_machine(machine)}", fontsize=8)
    save_figure(fig, out / "scale.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    from dualpipe.schedules import SCHEDULES
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=list(SCHEDULES))
    p.add_argument("--ladder", nargs="+", type=_rung, default=None,
                   help="rungs RANKSxCHUNKS (default 8x20 16x64 32x256 64x1024 128x4096)")
    p.add_argument("--repeats", type=int, default=None, help="default 5 (--quick: 2)")
    p.add_argument("--quick", action="store_true", help="rungs up to 32x256, 2 repeats")
    p.add_argument("--out", default=None, help="output directory (default bench/results)")
    a = p.parse_args(argv)
    ladder = a.ladder or (QUICK_LADDER if a.quick else LADDER)
    repeats = a.repeats or (2 if a.quick else 5)
    if repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    out = out_dir(a.out)
    machine = machine_info("none (single process)")
    cfg = {"schedules": a.schedules, "ladder": [list(r) for r in ladder], "repeats": repeats,
           "quick": a.quick, "target": TARGET}
    t0 = time.perf_counter()
    for name in a.schedules:
        for ranks, chunks in ladder:
            try:
                SCHEDULES[name](ranks, chunks)  # argument errors before any timing
            except ValueError as e:
                raise SystemExit(f"--ladder {ranks}x{chunks} does not fit {name}: {e}")
    rows = measure(a.schedules, ladder, repeats, log=lambda m: print(m, flush=True))
    grow = growth(rows)
    machine["load_avg_1_5_15_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(out / "scale.json", {
        "benchmark": "scale", "machine": machine, "config": cfg,
        "units": "seconds (medians over repeats); per-action figures in microseconds",
        "wall_s": time.perf_counter() - t0, "growth": grow, "result": rows})
    table = render(cfg, machine, rows, grow, out)
    print(f"[scale] wrote {out / 'scale.json'}, scale.md, scale.png "
          f"({time.perf_counter() - t0:.0f} s)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
