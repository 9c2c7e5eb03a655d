"""Measured vs simulated bubble: every schedule through our runtime on calibrated stages.

Each stage is one calibrated layer (``bench.stages.sleep_layer_class``): its forward
costs F, its backward B, of which W is the weight part that a deferred ``W`` action runs
(``I`` costs B - W).  On CPU the cost is a host sleep, so the rank count is not limited by
the cores; on CUDA (``--backend nccl``) it is ``torch.cuda._sleep``.

For every schedule, rank count and micro-batch count the benchmark runs warm-up steps
and timed steps, and compares

* the measured makespan (max end - min start over ranks, system-wide monotonic clock)
  with the simulator's makespan for ``Costs(F, B, W, F&B = F + B, latency)`` where the
  latency is the one the pipeline saw (producer's end to the end of the consumer's wait,
  median over waited-for transfers) -- target: within 5 %;
* each rank's measured idle (step wall - time inside compute actions) with the
  simulator's idle for that rank;
* the simulator fed with the *measured* mean cost of each action kind (sleep overshoot
  and per-action runtime cost included), which separates "the schedule behaves as
  modelled" from "an action costs more than its nominal F/B/W".

    python -m bench.bubble                       # ranks 4 and 8, 2R and 3R micro-batches
    python -m bench.bubble --ranks 4 --f 0.01 --b 0.02 --w 0.01 --repeats 5

Writes ``bubble.json``, ``bubble.md``, ``bubble.png`` and a measured timeline
(``bubble_timeline.png``) under ``bench/results/`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import gc
import sys
import time

from bench.machine import describe_machine, machine_info
from bench.pipelines import build_ours, rank_io
from bench.report import md_table, new_figure, out_dir, save_figure, text_table, write_json
from bench.stages import calibrate_host_sleep, mse, sleep_layer_class, sleep_stage
from bench.stats import summarize
from dualpipe.launch import makespans, timed

SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "zb1p")
DIM = 16       # features of the (tiny) activations
ROWS = 2       # rows per micro-batch


def default_chunks(name: str, ranks: int) -> list[int]:
    """Two micro-batch counts per rank count: the minimum every schedule accepts (2 x
    ranks) and 3 x ranks."""
    return [2 * ranks, 3 * ranks]


def valid(name: str, ranks: int, chunks: int) -> bool:
    from dualpipe.schedules import get_schedule
    try:
        get_schedule(name, ranks, chunks)
        return True
    except ValueError:
        return False


def _latency(rank: int, world: int, iters: int = 30) -> float | None:
    """One-way latency of an activation-sized gloo message rank 0 <-> rank 1 (median
    round trip / 2), measured with the same isend/irecv path the runtime uses."""
    import torch
    import torch.distributed as dist
    if world < 2:
        return 0.0
    buf = torch.zeros(ROWS, DIM)
    rtts = []
    dist.barrier()
    for i in range(iters + 5):
        if rank == 0:
            t0 = time.perf_counter()
            dist.isend(buf, 1).wait()
            dist.irecv(buf, 1).wait()
            if i >= 5:
                rtts.append(time.perf_counter() - t0)
        elif rank == 1:
            dist.irecv(buf, 0).wait()
            dist.isend(buf, 0).wait()
    dist.barrier()
    if rank != 0:
        return None
    rtts.sort()
    return rtts[len(rtts) // 2] / 2


def _rank_main(rank: int, world: int, cfg: dict):
    import torch

    from dualpipe import WeightGradStore  # noqa: F401 - the stages defer through it
    dev = torch.device("cuda", rank) if cfg["backend"] == "nccl" else torch.device("cpu")
    f, b, w = cfg["f"], cfg["b"], cfg["w"]
    bias = calibrate_host_sleep() if dev.type == "cpu" else 0.0
    out = {"latency": _latency(rank, world), "sleep_bias": bias, "cases": []}
    for name in cfg["schedules"]:
        for N in cfg["chunks"][name]:
            def make(stage):
                return sleep_stage(1, DIM, f, b, w).to(dev)
            pipe, s = build_ours(name, rank, world, N, make, timeout=cfg["timeout"])
            x = torch.randn(N * ROWS, DIM, device=dev)
            y = torch.randn(N * ROWS, DIM, device=dev)
            inputs, labels = rank_io(s, rank, x, y, ROWS)
            crit = mse if labels else None
            spans, stats = [], []
            pipe_start = [0.0]

            def step():
                pipe_start[0] = time.perf_counter()  # the timeline counts from here (+ us)
                return pipe.step(*inputs, num_chunks=N, criterion=crit, labels=labels)
            for i in range(cfg["warmup"] + cfg["repeats"]):
                pipe.zero_grad(set_to_none=True)
                t0, t1, _ = timed(step, dev)
                if i >= cfg["warmup"]:
                    st = pipe.last_stats
                    spans.append((t0, t1))
                    stats.append({"wall": st.wall, "busy": st.busy, "wait": st.wait})
            tl = [(iv.start, iv.end, str(iv.action), iv.lane) for iv in pipe.timeline]
            out["cases"].append({"schedule": name, "chunks": N, "spans": spans,
                                 "stats": stats, "timeline": tl,
                                 "step_start": pipe_start[0]})
            del pipe
            gc.collect()
    return out


def pipeline_latency(s, timelines, starts) -> tuple[float | None, int]:
    """Latency of a transfer as the pipeline saw it: for every wait on a receive before a
    single-part action (F, B or I) that began before the producing action on the other
    rank ended, the time from that end to the end of the wait (one system-wide clock:
    ``starts[r]`` is rank r's step start, timeline times are relative to it).  Returns
    (median seconds, samples)."""
    from dualpipe.schedules import parse_action
    owner = s.stage_owner
    done = {}
    for r, tl in enumerate(timelines):
        for (a, e, text, lane) in tl:
            if lane != "compute":
                continue
            for kind, c, m in parse_action(text).parts():
                st, stage = s.placement[r][c]
                done[(st, stage, m, "F" if kind == "F" else kind)] = starts[r] + e
    samples = []
    for r, tl in enumerate(timelines):
        for (a, e, text, lane) in tl:
            if lane != "wait" or "+" in text:
                continue
            act = parse_action(text)
            st, stage = s.placement[r][act.chunk]
            if act.kind == "F":
                src = (st, stage - 1, act.mb, "F")
                prod = owner.get((st, stage - 1))
            else:
                src = None
                for k in ("B", "I"):
                    if (st, stage + 1, act.mb, k) in done:
                        src = (st, stage + 1, act.mb, k)
                prod = owner.get((st, stage + 1))
            if src is None or prod is None or prod[0] == r or src not in done:
                continue
            # only waits that began before the data was produced: the receive was posted
            # by then, so the wait's end - the production's end is the transfer's
            # latency (wake-up included), not a late-posted receive
            if starts[r] + a <= done[src]:
                samples.append(starts[r] + e - done[src])
    if not samples:
        return None, 0
    samples.sort()
    # a wait can end before the producing action's recorded end (the runtime posts the
    # send inside the action, and its interval closes after that): with few samples the
    # median can come out below 0, which no transfer takes and Costs refuses (a smoke
    # run failed once with a ValueError "c..." from here, by all appearances this one)
    return max(0.0, samples[len(samples) // 2]), len(samples)


def _measured_costs(timelines, f, b, w):
    """Median measured duration of each action kind (seconds) -> Costs."""
    from dualpipe.simulate import Costs
    sums: dict[str, list[float]] = {}
    for tl in timelines:
        for (s, e, text, lane) in tl:
            if lane != "compute":
                continue
            kind = "FB" if "+" in text else text[0]
            sums.setdefault(kind, []).append(e - s)

    def mean(k):  # the median: one stalled action must not move the figure
        v = sorted(sums.get(k) or [])
        return v[len(v) // 2] if v else None
    mf = mean("F") or f
    mw = mean("W")
    mb = mean("B")
    mi = mean("I")
    if mb is None:
        mb = (mi if mi is not None else b - w) + (mw if mw is not None else w)
    if mw is None:
        mw = w * mb / b
    mw = min(mw, mb)
    fb = mean("FB")
    return Costs(f=mf, b=mb, w=mw, fb=fb if fb is not None else mf + mb)


def analyse(cfg: dict, results_by_world: dict) -> dict:
    from dualpipe.schedules import get_schedule
    from dualpipe.simulate import Costs, simulate
    f, b, w = cfg["f"], cfg["b"], cfg["w"]
    rows = []
    for world, per_rank in results_by_world.items():
        ping = per_rank[0]["latency"]
        ncases = len(per_rank[0]["cases"])
        for ci in range(ncases):
            cases = [r["cases"][ci] for r in per_rank]
            name, N = cases[0]["schedule"], cases[0]["chunks"]
            s = get_schedule(name, world, N)
            lat, nlat = pipeline_latency(s, [c["timeline"] for c in cases],
                                         [c["step_start"] for c in cases])
            if lat is None:
                lat = ping
            spans = [c["spans"] for c in cases]
            mk = makespans(spans)
            mks = summarize(mk)
            sim0 = simulate(s, Costs(f, b, w, fb=f + b))
            sim = simulate(s, Costs(f, b, w, fb=f + b, latency=lat))
            mcost = _measured_costs([c["timeline"] for c in cases], f, b, w)
            mcost_lat = Costs(mcost.f, mcost.b, mcost.w, fb=mcost.fb, latency=lat)
            simm = simulate(s, mcost_lat)
            # idle as the simulator defines it: the step's makespan (over all ranks)
            # minus the rank's time inside compute actions, per repeat, then the median
            idle_meas = [summarize([m - st["busy"] for m, st in zip(mk, c["stats"])])
                         ["median"] for c in cases]
            wall_meas = [summarize([st["wall"] for st in c["stats"]])["median"]
                         for c in cases]
            wait_meas = [summarize([st["wait"] for st in c["stats"]])["median"]
                         for c in cases]
            rows.append({
                "schedule": name, "ranks": world, "chunks": N,
                "makespan_measured_s": mks, "makespan_sim_s": sim.makespan,
                "makespan_sim_no_latency_s": sim0.makespan,
                "makespan_sim_measured_costs_s": simm.makespan,
                "ratio_measured_to_sim": mks["median"] / sim.makespan,
                "ratio_best_to_sim": mks["min"] / sim.makespan,
                "ratio_measured_to_sim_measured_costs": mks["median"] / simm.makespan,
                "within_5pct": abs(mks["median"] / sim.makespan - 1) <= 0.05,
                "latency_s": lat, "latency_samples": nlat, "latency_pingpong_s": ping,
                "measured_costs_s": {"f": mcost.f, "b": mcost.b, "w": mcost.w, "fb": mcost.pair},
                "idle_measured_s": idle_meas, "idle_sim_s": sim.idle,
                "idle_sim_measured_costs_s": simm.idle,
                "wall_measured_s": wall_meas, "recv_wait_measured_s": wait_meas,
                "bubble_measured_s": max(idle_meas), "bubble_sim_s": sim.bubble,
                "formula_bubble": sim0.formula_bubble,
                "timeline": [c["timeline"] for c in cases],
            })
    return {"rows": rows}


def render(cfg, machine, res, out) -> str:
    from dualpipe.draw import draw
    from dualpipe.schedules import get_schedule, parse_action
    from dualpipe.simulate import Interval
    rows = res["rows"]
    headers = ["schedule", "ranks", "chunks", "measured makespan ms (median [IQR])",
               "lat. us", "simulated ms (+latency)", "measured/simulated", "within 5%",
               "best/simulated", "measured/sim(measured costs)", "bubble meas. ms",
               "bubble sim. ms"]
    table = []
    for r in rows:
        m = r["makespan_measured_s"]
        table.append([r["schedule"], r["ranks"], r["chunks"],
                      f"{m['median'] * 1e3:.1f} [{m['iqr'] * 1e3:.1f}]",
                      f"{r['latency_s'] * 1e6:.0f}",
                      f"{r['makespan_sim_s'] * 1e3:.1f}",
                      f"{r['ratio_measured_to_sim']:.3f}",
                      "yes" if r["within_5pct"] else "NO",
                      f"{r['ratio_best_to_sim']:.3f}",
                      f"{r['ratio_measured_to_sim_measured_costs']:.3f}",
                      f"{r['bubble_measured_s'] * 1e3:.1f}", f"{r['bubble_sim_s'] * 1e3:.1f}"])
    idle_headers = ["schedule", "ranks", "chunks", "idle per rank, measured ms",
                    "idle per rank, simulated ms"]
    idle_rows = [[r["schedule"], r["ranks"], r["chunks"],
                  " ".join(f"{x * 1e3:.0f}" for x in r["idle_measured_s"]),
                  " ".join(f"{x * 1e3:.0f}" for x in r["idle_sim_s"])] for r in rows]
    ping = sorted({r["ranks"]: r["latency_pingpong_s"] for r in rows}.items())
    md = [f"# Measured vs simulated bubble (`python -m bench.bubble`)", "",
          f"Machine: {describe_machine(machine)}.", "",
          f"Costs per stage: F = {cfg['f'] * 1e3:g} ms, B = {cfg['b'] * 1e3:g} ms, "
          f"W = {cfg['w'] * 1e3:g} ms (I = B - W), F&B = F + B (no overlap of sleeps), "
          "each sleep shortened by the rank's measured `time.sleep` overshoot (median "
          f"{res['sleep_bias_us']:.0f} us over ranks); "
          f"{cfg['repeats']} timed steps after {cfg['warmup']} warm-up. Latency (column "
          "\"lat.\"): per case, the median time from the end of a producing action to the "
          "end of the consumer's wait for its output, over waits that began before the "
          "output was produced (the receive was posted by then: pure transfer latency as "
          "the pipeline saw it, wake-up included); for reference a "
          "ping-pong between ranks 0 and 1 gave " + ", ".join(
              f"{lt * 1e6:.0f} us ({w} ranks)" for w, lt in ping) + " one way.",
          "", md_note(), "", md_table(headers, table), "",
          "Idle per rank (makespan - the rank's time inside compute actions, as the "
          "simulator defines it; median of the timed steps) against the simulator:", "", md_table(idle_headers, idle_rows), ""]
    # plots
    fig, (ax1, ax2) = new_figure(2, 6.5, 4.2)
    labels = [f"{r['schedule']}\n{r['ranks']}x{r['chunks']}" for r in rows]
    xs = range(len(rows))
    ax1.bar(xs, [r["ratio_measured_to_sim"] for r in rows], color="#4477aa",
            label="measured / simulated")
    ax1.scatter(xs, [r["ratio_measured_to_sim_measured_costs"] for r in rows], color="#ee6677",
                zorder=3, label="measured / sim(measured costs)")
    ax1.axhline(1.05, color="k", ls="--", lw=0.8, label="target 1.05")
    ax1.axhline(1.0, color="gray", lw=0.6)
    ax1.set_xticks(list(xs))
    ax1.set_xticklabels(labels, fontsize=6, rotation=90)
    lo = min(min(r["ratio_measured_to_sim"] for r in rows), 0.95)
    ax1.set_ylim(lo - 0.02, max(1.1, max(r["ratio_measured_to_sim"] for r in rows) + 0.02))
    ax1.set_ylabel("makespan ratio")
    ax1.set_title("measured makespan / simulated (+ measured latency)", fontsize=9)
    ax1.legend(fontsize=7)
    big = max(r["ranks"] for r in rows)
    colors = {"dualpipe": "#4477aa", "dualpipev": "#228833", "1f1b": "#ee6677", "zb1p": "#aa3377"}
    for r in rows:
        if r["ranks"] != big or r["chunks"] != max(q["chunks"] for q in rows
                                                    if q["schedule"] == r["schedule"]
                                                    and q["ranks"] == big):
            continue
        c = colors.get(r["schedule"], "k")
        ax2.plot(range(big), [x * 1e3 for x in r["idle_measured_s"]], "-o", color=c, ms=3,
                 label=f"{r['schedule']} {big}x{r['chunks']} measured")
        ax2.plot(range(big), [x * 1e3 for x in r["idle_sim_s"]], "--", color=c, lw=1,
                 label=f"{r['schedule']} simulated")
    ax2.set_xlabel("rank")
    ax2.set_ylabel("idle per step (ms)")
    ax2.set_title(f"idle per rank, {big} ranks", fontsize=9)
    ax2.legend(fontsize=6, ncol=2)
    fig.suptitle(f"bench.bubble — {describe_machine(machine)}", fontsize=8)
    save_figure(fig, out / "bubble.png")
    md += ["![measured vs simulated](bubble.png)", ""]
    # one measured timeline, the biggest DualPipe case
    pick = [r for r in rows if r["schedule"] == "dualpipe" and r["ranks"] == big] or rows
    r = pick[-1]
    res["drawn"] = (r["schedule"], r["ranks"], r["chunks"])
    s = get_schedule(r["schedule"], r["ranks"], r["chunks"])
    ivs = [Interval(rank, a, e, parse_action(t), lane)
           for rank, tl in enumerate(r["timeline"]) for (a, e, t, lane) in tl]
    draw(str(out / "bubble_timeline.png"), ivs, s, time_unit="s",
         title=f"{r['schedule']} {r['ranks']} ranks x {r['chunks']} chunks, measured "
               f"(sleep stages F={cfg['f'] * 1e3:g} B={cfg['b'] * 1e3:g} W={cfg['w'] * 1e3:g} ms)")
    md += [f"Measured timeline of the last step of {r['schedule']} {r['ranks']}x{r['chunks']} "
           "(compute lane and waits on receives):", "", "![timeline](bubble_timeline.png)", ""]
    (out / "bubble.md").write_text("\n".join(md))
    return text_table(headers[:3] + ["measured ms", "lat us", "simulated ms", "ratio",
                                            "<=5%", "best ratio", "ratio (measured costs)"],
                             [t[:3] + [t[3].split()[0], t[4], t[5], t[6], t[7], t[8], t[9]]
                              for t in table])


def md_note() -> str:
    return ("\"simulated\" = `dualpipe.simulate.simulate(schedule, Costs(F, B, W, F+B, "
            "latency))` with the nominal costs; \"sim(measured costs)\" feeds the simulator "
            "the median measured duration of each action kind instead (sleep overshoot and the "
            "runtime's per-action cost included). Makespan = max end - min start over ranks "
            "(one system-wide monotonic clock); \"best\" = the fastest timed step (load "
            "from other processes on a shared machine only adds time).")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bubble", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--chunks", type=int, nargs="+", default=None,
                   help="micro-batch counts (default: 2 x ranks and 3 x ranks)")
    p.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES)
    p.add_argument("--f", type=float, default=0.020, help="forward cost per stage, seconds")
    p.add_argument("--b", type=float, default=0.040, help="full backward cost, seconds")
    p.add_argument("--w", type=float, default=0.020, help="weight-gradient part of b, seconds")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default=None, help="output directory (default bench/results)")
    a = p.parse_args(argv)
    import torch

    from dualpipe.launch import run_ranks
    if a.backend == "nccl" and (not torch.cuda.is_available()
                                or torch.cuda.device_count() < max(a.ranks)):
        print(f"--backend nccl needs {max(a.ranks)} GPUs; this machine has "
              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}", file=sys.stderr)
        return 2
    out = out_dir(a.out)
    machine = machine_info(a.backend, threads_per_rank=1)
    cfg = dict(f=a.f, b=a.b, w=a.w, warmup=a.warmup, repeats=a.repeats, backend=a.backend,
               timeout=a.timeout, schedules=a.schedules)
    t_start = time.perf_counter()
    results = {}
    for world in a.ranks:
        chunks = {name: [n for n in (a.chunks or default_chunks(name, world))
                         if valid(name, world, n)] for name in a.schedules}
        cfg_w = dict(cfg, chunks=chunks)
        todo = sum(len(v) for v in chunks.values())
        print(f"[bubble] {world} ranks: {todo} cases ({', '.join(f'{k} {v}' for k, v in chunks.items())})",
              flush=True)
        t0 = time.perf_counter()
        results[world] = run_ranks(_rank_main, world, cfg_w, backend=a.backend,
                                   timeout=max(600.0, a.timeout * 4))
        print(f"[bubble] {world} ranks done in {time.perf_counter() - t0:.1f} s", flush=True)
    res = analyse(cfg, results)
    biases = [r["sleep_bias"] for per_rank in results.values() for r in per_rank]
    res["sleep_bias_us"] = sorted(biases)[len(biases) // 2] * 1e6
    machine["load_avg_1_5_15_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    table = render(cfg, machine, res, out)
    drawn = res.get("drawn")
    rows = []
    for r in res["rows"]:  # keep the measured timeline of the drawn case only
        r = dict(r)
        tl = r.pop("timeline")
        if (r["schedule"], r["ranks"], r["chunks"]) == drawn:
            r["timeline_last_step"] = [[(round(a, 6), round(e, 6), t, lane)
                                        for (a, e, t, lane) in rank_tl] for rank_tl in tl]
        rows.append(r)
    payload = {"benchmark": "bubble", "machine": machine, "config": cfg,
               "sleep_bias_s": {w: [r["sleep_bias"] for r in pr] for w, pr in results.items()},
               "units": "seconds", "wall_s": time.perf_counter() - t_start, "rows": rows}
    write_json(out / "bubble.json", payload)
    print(f"[bubble] wrote {out / 'bubble.json'}, bubble.md, bubble.png, bubble_timeline.png "
          f"({time.perf_counter() - t_start:.0f} s)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
