"""Head to head with ``torch.distributed.pipelining`` in the same run.

Same processes, same stage modules (separate copies with identical weights), same
micro-batches, same loss, backward included, alternating which side goes first:

* our ``DualPipeV``                 vs torch ``ScheduleDualPipeV`` (torch >= 2.8)
* our ``Pipeline(schedule="1f1b")`` vs torch ``Schedule1F1B``
* our ``DualPipe``                  for reference (torch has no DualPipe)

Our side runs on each transport of ``--transports``: "ours" is the default (shared
memory between the ranks of this host, ``overlap.shm``), "ours on gloo" the process
group's gloo, the transport torch's schedules use; so the table separates what the
transport saves from what the runtime saves.

Two stage kinds:

``mlp``   real compute: residual MLP blocks (LayerNorm, Linear d->4d, GELU, Linear 4d->d),
          one torch thread per rank (default 2 ranks on this 2-core machine);
``sleep`` calibrated layers (``bench.stages.sleep_layer_class``): the forward sleeps F,
          the backward B, split into an input part B - W and a weight part W that both
          runtimes can defer, so 4 and 8 ranks fit on few cores.

The model is always ``2 x ranks`` layers: DualPipeV puts one layer on each of its
``2R`` stages, 1F1B two layers on each of its ``R`` stages, DualPipe two layers on each
of its ``R`` stages (held twice: both directions).  Step time = max end - min start over
ranks of one step (barrier before each).  Reported: median and IQR of each side's step
time over the timed repeats (warm-up excluded) and of the paired ratio ours / torch;
target ours <= 0.9 x torch.  For our side the runtime's own split of each rank's step
(``last_stats``: inside compute actions, waiting on receives, the rest) says where the
time goes; torch's time waiting on its p2p works is measured by wrapping
``schedules._wait_batch_p2p``.

    python -m bench.vs_torch                    # mlp on 2 ranks, sleep on 4 and 8 ranks
    python -m bench.vs_torch --cases mlp --repeats 20
"""
from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time

from bench.machine import describe_machine, machine_info
from bench.pipelines import build_ours, rank_io, torch_pipelining_status
from bench.probes import (ours_post_probe, ours_wait_probe, torch_busy_probe, torch_post_probe,
                          torch_wait_probe)
from bench.report import md_table, new_figure, out_dir, save_figure, text_table, write_json
from bench.stages import calibrate_host_sleep, mlp_stage, mse, sleep_layer_class, sleep_stage
from bench.stats import ratio_samples, summarize
from dualpipe.launch import makespans, timed

PAIRS = ("dualpipev", "1f1b", "dualpipe")
# our sides: label -> transport ("auto": shared memory between the ranks of this host,
# our default; "group": the process group's gloo, the transport torch uses)
OURS = {"ours": "auto", "ours on gloo": "group"}


def _kw_supported(fn, **kw):
    params = inspect.signature(fn).parameters
    return {k: v for k, v in kw.items() if k in params}


def _build_torch(name: str, rank: int, world: int, N: int, make_stage, dev):
    """torch.distributed.pipelining schedule for ``name`` (None when unavailable)."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining import schedules as sch
    if name == "dualpipev":
        cls = getattr(sch, "ScheduleDualPipeV", None)
        if cls is None:
            return None
        S = 2 * world
        stages = [PipelineStage(make_stage(i), i, S, dev) for i in (rank, S - 1 - rank)]
        sched = cls(stages, N, loss_fn=mse, **_kw_supported(cls.__init__, scale_grads=False))
        first = rank == 0
        last = rank == 0
    elif name == "1f1b":
        stage = PipelineStage(make_stage(rank), rank, world, dev)
        cls = sch.Schedule1F1B
        sched = cls(stage, N, loss_fn=mse, **_kw_supported(cls.__init__, scale_grads=False))
        stages = [stage]
        first, last = rank == 0, rank == world - 1
    else:
        return None
    return sched, stages, first, last


def _rank_main(rank: int, world: int, cfg: dict):
    import torch

    dev = torch.device("cpu")
    R, N, rows, dim = world, cfg["chunks"], cfg["rows"], cfg["dim"]
    if cfg["stages"] == "sleep":
        calibrate_host_sleep()
    wait_acc = torch_wait_probe()
    busy_acc = torch_busy_probe()
    tpost_acc = torch_post_probe()
    ours_acc = ours_wait_probe()
    opost_acc = ours_post_probe()

    def layers_for(name):
        return 1 if name == "dualpipev" else 2

    def maker(name):
        L = layers_for(name)
        if cfg["stages"] == "sleep":
            return lambda stage: sleep_stage(L, dim, cfg["f"], cfg["b"], cfg["w"])
        return lambda stage: mlp_stage(L, dim, seed=1000 * L + stage)

    g = torch.Generator().manual_seed(7)
    x = torch.randn(N * rows, dim, generator=g)
    y = torch.randn(N * rows, dim, generator=g)

    runners = {}
    checks = {}
    for name in cfg["pairs"]:
        # ours, on each transport asked for
        for side, transport in OURS.items():
            if transport not in cfg["transports"]:
                continue
            pipe, s = build_ours(name, rank, world, N, maker(name),
                                        timeout=cfg["timeout"],
                                        split_linear_weight_grads=cfg["split_w"],
                                        transport=transport)
            inputs, labels = rank_io(s, rank, x, y, rows)
            crit = mse if labels else None

            def ours(pipe=pipe, inputs=inputs, labels=labels, crit=crit):
                loss, _ = pipe.step(*inputs, num_chunks=N, criterion=crit, labels=labels)
                return loss
            runners[(name, side)] = (ours, pipe)
        # torch
        built = _build_torch(name, rank, world, N, maker(name), dev)
        if built is not None:
            sched, stages, first, last = built

            def theirs(sched=sched, first=first, last=last):
                losses = [] if last else None
                args = (x,) if first else ()
                kw = {"target": y, "losses": losses} if last else {}
                sched.step(*args, **kw)
                return torch.stack([l.detach() for l in losses]) if last else None
            runners[(name, "torch")] = (theirs, stages)

    def zero(obj):
        mods = [obj] if not isinstance(obj, list) else [st.submod for st in obj]
        for m in mods:
            m.zero_grad(set_to_none=True)

    def grads(obj):
        mods = [obj] if not isinstance(obj, list) else [st.submod for st in obj]
        return [p.grad.detach().clone() if p.grad is not None else None
                for m in mods for p in m.parameters()]

    times = {k: [] for k in runners}
    stats = {k: [] for k in runners}
    for rep in range(cfg["warmup"] + cfg["repeats"]):
        for name in cfg["pairs"]:
            sides = [*OURS, "torch"]
            for side in (sides if rep % 2 == 0 else sides[::-1]):
                key = (name, side)
                if key not in runners:
                    continue
                fn, obj = runners[key]
                zero(obj)
                w0, o0, b0 = wait_acc[0], ours_acc[0], busy_acc[0]
                tp0, os0, or0 = tpost_acc[0], opost_acc["send"], opost_acc["recv"]
                t0, t1, loss = timed(fn)
                w1, o1, b1 = wait_acc[0], ours_acc[0], busy_acc[0]
                tp1, os1, or1 = tpost_acc[0], opost_acc["send"], opost_acc["recv"]
                if rep == 0:
                    checks[key] = {"loss": loss, "grads": grads(obj)}
                if rep >= cfg["warmup"]:
                    times[key].append((t0, t1))
                    if side in OURS:
                        st = obj.last_stats
                        # sends are posted inside compute actions, receives outside
                        stats[key].append({"wall": t1 - t0, "busy": st.busy - (os1 - os0),
                                           "post": (os1 - os0) + (or1 - or0),
                                           "recv_wait": st.wait, "wait": o1 - o0})
                    else:
                        stats[key].append({"wall": t1 - t0, "busy": b1 - b0,
                                           "post": tp1 - tp0, "wait": w1 - w0})
        gc.collect()
    # equal work: same losses and gradients on both sides at the first step
    eq = {}
    for name, side in [(n, o) for n in cfg["pairs"] for o in OURS]:
        a, b = checks.get((name, side)), checks.get((name, "torch"))
        if a is None or b is None:
            continue
        ld = None
        if a["loss"] is not None and b["loss"] is not None:
            ld = float((a["loss"] - b["loss"]).abs().max())
        gd = max((float((p - q).abs().max()) / (float(q.abs().max()) + 1e-30)
                  for p, q in zip(a["grads"], b["grads"]) if p is not None and q is not None),
                 default=0.0)
        eq[name if side == "ours" else f"{name}|{side}"] = {"loss_max_abs_diff": ld, "grad_max_rel_diff": gd,
                    "n_grads": sum(1 for p in a["grads"] if p is not None)}
    return {"transports": {f"{k[0]}|{k[1]}": getattr(obj, "transport", "gloo (torch)")
                           for k, (_fn, obj) in runners.items()},
            "times": {f"{k[0]}|{k[1]}": v for k, v in times.items()},
            "stats": {f"{k[0]}|{k[1]}": v for k, v in stats.items()}, "equal_work": eq}


def analyse(case: dict, per_rank: list) -> dict:
    keys = list(per_rank[0]["times"])
    mk = {k: makespans([r["times"][k] for r in per_rank]) for k in keys}
    out = {"case": case, "sides": {}, "pairs": {}}
    for k in keys:
        name, side = k.split("|")
        st = [r["stats"][k] for r in per_rank]
        n = len(st[0])
        per_rank_med = []
        for r, rs in enumerate(st):
            d = {"wall_ms": summarize([x["wall"] for x in rs])["median"] * 1e3,
                 "wait_ms": summarize([x["wait"] for x in rs])["median"] * 1e3}
            if "busy" in rs[0]:
                d["busy_ms"] = summarize([x["busy"] for x in rs])["median"] * 1e3
                if "recv_wait" in rs[0]:
                    d["recv_wait_ms"] = summarize([x["recv_wait"] for x in rs])["median"] * 1e3
                d["post_ms"] = summarize([x["post"] for x in rs])["median"] * 1e3
                d["other_ms"] = summarize(
                    [x["wall"] - x["busy"] - x["wait"] - x["post"] for x in rs])["median"] * 1e3
            per_rank_med.append(d)
        out["sides"][k] = {"step_s": summarize(mk[k]), "samples_s": mk[k],
                           "per_rank": per_rank_med, "n": n}
    sims = {}
    if case["stages"] == "sleep":
        # the schedule's own makespan for the nominal costs (no latency, no overshoot):
        # the floor any runtime of that schedule approaches
        from dualpipe.schedules import get_schedule
        from dualpipe.simulate import Costs, simulate
        for name in case["pairs"]:
            L = 1 if name == "dualpipev" else 2
            c = Costs(case["f"] * L, case["b"] * L, case["w"] * L,
                      fb=(case["f"] + case["b"]) * L)
            sims[name] = simulate(get_schedule(name, case["ranks"], case["chunks"]), c).makespan
    out["simulated_makespan_s"] = sims
    for name, side in [(n, o) for n in case["pairs"] for o in OURS]:
        a, b = f"{name}|{side}", f"{name}|torch"
        key = name if side == "ours" else f"{name}|{side}"
        if a in mk and b in mk:
            ratios = ratio_samples(mk[a], mk[b])
            out["pairs"][key] = {"ratio": summarize(ratios), "samples": ratios,
                                  "ratio_of_minima": min(mk[a]) / min(mk[b]),
                                  "target_met": summarize(ratios)["median"] <= 0.9,
                                  "equal_work": [r["equal_work"].get(key) for r in per_rank]}
        elif a in mk:
            out["pairs"][key] = {"ratio": None, "reason": case.get("torch_missing", {}).get(
                name, "torch has no such schedule (reference only)")}
    return out


def run_case(case: dict) -> dict:
    from dualpipe.launch import run_ranks
    t0 = time.perf_counter()
    per_rank = run_ranks(_rank_main, case["ranks"], case, threads=1,
                         timeout=max(600.0, case["timeout"] * 4))
    res = analyse(case, per_rank)
    res["wall_s"] = time.perf_counter() - t0
    return res


def render(machine, status, results, out) -> str:
    md = ["# Step time against torch.distributed.pipelining (`python -m bench.vs_torch`)", "",
          f"Machine: {describe_machine(machine)}.", "",
          "Same processes, modules, micro-batches and loss on both sides; each repeat runs "
          "both back to back, alternating which goes first. Step time = max end - min start "
          "over ranks. Ratio = ours / torch per repeat (paired), median [IQR]; "
          "target <= 0.9. \"best\" = the fastest repeat of each side (noise on a shared "
          "machine only ever adds time). \"simulated\" (sleep stages) = the schedule's "
          "makespan for the nominal costs without latency or sleep overshoot, the floor "
          "any runtime of that schedule approaches. \"equal work\": largest difference "
          "between the two sides' losses and gradients after the first step.", ""]
    if status.get("reason"):
        md += [f"Skipped: {status['reason']}.", ""]
    headers = ["case", "schedule", "ours ms (median [IQR])", "torch ms (median [IQR])",
               "ours / torch (median [IQR])", "target <= 0.9", "best ours / best torch",
               "simulated ms (ours/sim, torch/sim)", "equal work (loss diff, grad rel diff)"]
    rows, text_rows = [], []
    for res in results:
        c = res["case"]
        label = (f"{c['stages']} {c['ranks']}r x {c['chunks']}mb"
                 + (f" d={c['dim']}" if c["stages"] == "mlp" else
                    f" F/B/W={c['f'] * 1e3:g}/{c['b'] * 1e3:g}/{c['w'] * 1e3:g}ms"))
        for name, side in [(n, o) for n in c["pairs"] for o in OURS]:
            ours = res["sides"].get(f"{name}|{side}")
            if ours is None:
                continue
            theirs = res["sides"].get(f"{name}|torch")
            pr = res["pairs"].get(name if side == "ours" else f"{name}|{side}", {})
            o = ours["step_s"] if ours else None
            t = theirs["step_s"] if theirs else None
            r = pr.get("ratio")
            sim = res.get("simulated_makespan_s", {}).get(name)
            sim_s = "-" if not sim else (
                f"{sim * 1e3:.0f} ({o['median'] / sim:.3f}, "
                + (f"{t['median'] / sim:.3f})" if t else "-)"))
            ew = pr.get("equal_work") or []
            ew = [e for e in ew if e]
            ew_s = ("-" if not ew else
                    f"{max((e['loss_max_abs_diff'] or 0) for e in ew):.1e}, "
                    f"{max(e['grad_max_rel_diff'] for e in ew):.1e}")
            row = [label, name if side == "ours" else f"{name} ({side})",
                   f"{o['median'] * 1e3:.2f} [{o['iqr'] * 1e3:.2f}]" if o else "-",
                   f"{t['median'] * 1e3:.2f} [{t['iqr'] * 1e3:.2f}]" if t else "-",
                   f"{r['median']:.3f} [{r['q1']:.3f}-{r['q3']:.3f}]" if r else
                   pr.get("reason", "-"),
                   ("met" if pr["target_met"] else "NOT met") if r else "-",
                   f"{pr['ratio_of_minima']:.3f}" if r else "-", sim_s, ew_s]
            rows.append(row)
            text_rows.append(row[:6])
    md += [md_table(headers, rows), ""]
    # where our time goes
    md += ["Where each rank's step time goes (medians over the timed steps, ms): wall "
           "(barrier to end of step) / compute = inside compute actions (ours: "
           "`last_stats.busy` less the send posting done inside them; torch: "
           "`forward_one_chunk`, `backward_one_chunk`, `backward_weight_one_chunk` and the "
           "loss) / post = enqueueing transfers (ours: `isend/irecv` of `overlap.p2p.P2P` "
           "or `overlap.shm.ShmP2P`; torch: `schedules._batch_p2p`) / wait = blocked on "
           "transfers (ours: `Handle.wait` of either, i.e. receives, the step handshake, "
           "the send drain; "
           "torch: `schedules._wait_batch_p2p`) / other = the rest (scheduling, "
           "bookkeeping, argument handling).", ""]
    h2 = ["case", "schedule", "side", "per rank: wall / compute / post / wait / other ms"]
    r2 = []
    for res in results:
        c = res["case"]
        label = f"{c['stages']} {c['ranks']}r x {c['chunks']}mb"
        for k, v in res["sides"].items():
            name, side = k.split("|")
            cells = []
            for d in v["per_rank"]:
                cells.append(f"{d['wall_ms']:.1f}/{d['busy_ms']:.1f}/{d['post_ms']:.1f}/"
                             f"{d['wait_ms']:.1f}/{d['other_ms']:.1f}")
            r2.append([label, name, side, "; ".join(cells)])
    md += [md_table(h2, r2), ""]
    # plot: step-time ratio per case with IQR whiskers + absolute times
    fig, (ax1, ax2) = new_figure(2, 6.0, 4.0)
    labels, med, lo, hi = [], [], [], []
    for res in results:
        c = res["case"]
        for name, pr in res["pairs"].items():
            if pr.get("ratio"):
                r = pr["ratio"]
                labels.append(f"{name.replace('|ours ', ' ')}\n{c['stages']} {c['ranks']}r")
                med.append(r["median"])
                lo.append(r["median"] - r["q1"])
                hi.append(r["q3"] - r["median"])
    if med:
        xs = range(len(med))
        ax1.bar(xs, med, yerr=[lo, hi], capsize=3, color="#4477aa")
        ax1.axhline(0.9, color="k", ls="--", lw=0.8, label="target 0.9")
        ax1.axhline(1.0, color="gray", lw=0.6)
        ax1.set_xticks(list(xs))
        ax1.set_xticklabels(labels, fontsize=7)
        ax1.set_ylabel("step time ours / torch (median, IQR)")
        ax1.legend(fontsize=7)
    ax1.set_title("ours / torch.distributed.pipelining", fontsize=9)
    bl, bo, bg, bt = [], [], [], []
    for res in results:
        c = res["case"]
        for name in c["pairs"]:
            o = res["sides"].get(f"{name}|ours")
            og = res["sides"].get(f"{name}|ours on gloo")
            t = res["sides"].get(f"{name}|torch")
            bl.append(f"{name}\n{c['stages']} {c['ranks']}r")
            bo.append(o["step_s"]["median"] * 1e3 if o else 0)
            bg.append(og["step_s"]["median"] * 1e3 if og else 0)
            bt.append(t["step_s"]["median"] * 1e3 if t else 0)
    xs = list(range(len(bl)))
    ax2.bar([x - 0.27 for x in xs], bo, 0.27, label="ours (shared memory)", color="#228833")
    ax2.bar(xs, bg, 0.27, label="ours on gloo", color="#4477aa")
    ax2.bar([x + 0.27 for x in xs], bt, 0.27, label="torch (gloo)", color="#ee6677")
    ax2.set_xticks(xs)
    ax2.set_xticklabels(bl, fontsize=7)
    ax2.set_yscale("log")
    ax2.set_ylabel("step time, ms (median)")
    ax2.legend(fontsize=7)
    ax2.set_title("step time", fontsize=9)
    fig.suptitle(f"bench.vs_torch — {describe_machine(machine)}", fontsize=8)
    save_figure(fig, out / "vs_torch.png")
    md += ["![ours vs torch](vs_torch.png)", ""]
    (out / "vs_torch.md").write_text("\n".join(md))
    return text_table(["case", "schedule", "ours ms", "torch ms", "ours/torch", "<=0.9"],
                             text_rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vs_torch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=["mlp", "sleep"], choices=["mlp", "sleep"])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=PAIRS)
    p.add_argument("--mlp-ranks", type=int, default=2)
    p.add_argument("--mlp-chunks", type=int, default=8)
    p.add_argument("--dim", type=int, default=256, help="MLP hidden size")
    p.add_argument("--rows", type=int, default=32, help="rows per micro-batch (mlp)")
    p.add_argument("--sleep-ranks", type=int, nargs="+", default=[4, 8])
    p.add_argument("--sleep-chunks", type=int, default=16)
    p.add_argument("--f", type=float, default=0.005)
    p.add_argument("--b", type=float, default=0.010)
    p.add_argument("--w", type=float, default=0.005)
    p.add_argument("--no-split-w", dest="split_w", action="store_false",
                   help="our MLP runs without split_linear_weight_grads (W passes are empty)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=None,
                   help="timed repeats (default: 40 for mlp, 5 for sleep)")
    p.add_argument("--transports", nargs="+", default=["auto", "group"],
                   choices=["auto", "group"],
                   help="our runtime's transports to run (auto: shared memory on one host; "
                        "group: the process group's gloo, as torch)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    out = out_dir(a.out)
    status = torch_pipelining_status()
    machine = machine_info("gloo", threads_per_rank=1)
    pairs = list(a.pairs)
    missing = {}
    if not status["ScheduleDualPipeV"]:
        missing["dualpipev"] = status["reason"] or "no ScheduleDualPipeV"
        print(f"[vs_torch] {missing['dualpipev']}", flush=True)
    if not status["Schedule1F1B"]:
        missing["1f1b"] = status["reason"] or "no Schedule1F1B"
    cases = []
    if "mlp" in a.cases:
        cases.append(dict(stages="mlp", ranks=a.mlp_ranks, chunks=a.mlp_chunks, dim=a.dim,
                          rows=a.rows, f=0.0, b=0.0, w=0.0,
                          repeats=a.repeats or 40))
    if "sleep" in a.cases:
        for R in a.sleep_ranks:
            cases.append(dict(stages="sleep", ranks=R, chunks=max(a.sleep_chunks, 2 * R), dim=16,
                              rows=2, f=a.f, b=a.b, w=a.w, repeats=a.repeats or 5))
    t_start = time.perf_counter()
    results = []
    for c in cases:
        c.update(pairs=[n for n in pairs if not (n == "dualpipe" and c["ranks"] % 2)],
                 warmup=a.warmup, timeout=a.timeout, split_w=a.split_w, torch_missing=missing,
                 transports=list(a.transports))
        print(f"[vs_torch] {c['stages']}: {c['ranks']} ranks, {c['chunks']} micro-batches, "
              f"{c['warmup']} warm-up + {c['repeats']} timed repeats of {', '.join(c['pairs'])}",
              flush=True)
        res = run_case(c)
        print(f"[vs_torch]   done in {res['wall_s']:.1f} s", flush=True)
        results.append(res)
    machine["load_avg_1_5_15_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    payload = {"benchmark": "vs_torch", "machine": machine, "torch_pipelining": status,
               "units": "seconds (step times), ratios ours/torch",
               "wall_s": time.perf_counter() - t_start, "results": results}
    write_json(out / "vs_torch.json", payload)
    table = render(machine, status, results, out)
    print(f"[vs_torch] wrote {out / 'vs_torch.json'}, vs_torch.md, vs_torch.png "
          f"({time.perf_counter() - t_start:.0f} s)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
