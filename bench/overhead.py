"""Runtime cost per executed compute action, with near-zero-cost stages.

Every stage is one ``nn.Linear(4, 4)`` on ``1 x 4`` micro-batches, so a step's time is
almost all runtime: scheduling in Python, posting and matching transfers, waiting for
them.  In the same processes, back to back and alternating order:

* ours   ``DualPipeV`` with ``split_linear_weight_grads=True`` (W really deferred, like
  torch's I/W split), and without it ("no W split": W passes are empty); each on our
  default transport (shared memory between the ranks of this host, ``overlap.shm``)
  and "on gloo" (``transport="group"``: the process group's gloo, what torch uses), so
  the table separates what the transport saves from what the runtime saves;
* torch  ``ScheduleDualPipeV`` (torch >= 2.8);
* and the same for 1F1B (ours ``Pipeline(schedule="1f1b")`` vs torch ``Schedule1F1B``).

Per rank and step: ``wall`` (barrier to end of step), ``comm wait`` (time blocked in
waits on transfers: our ``Handle.wait`` of ``overlap.p2p`` and ``overlap.shm`` --
receives, step handshake, send drain -- and torch's ``schedules._wait_batch_p2p``), ``compute`` (the bare cost of the
rank's forwards and backwards, measured alone in the same process) and ``python`` =
wall - comm wait - compute: the scheduling cost.  Each is divided by the number of
compute actions the rank executes (F, B, I, W; an F&B pair counts as two), the same for
both runtimes.  Target: our per-action cost <= half of torch's.

    python -m bench.overhead                    # 2 ranks, 16 micro-batches
    python -m bench.overhead --ranks 4 --chunks 32 --repeats 100 --profile
    python -m bench.overhead --lookahead 8          # receives posted 8 actions ahead

``--profile`` also runs cProfile over a few extra steps of each side on rank 0 and
writes the top functions (``overhead_profile.txt``).
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import sys
import time

from bench.machine import describe_machine, machine_info
from bench.pipelines import build_ours, rank_io, torch_pipelining_status
from bench.probes import ours_post_probe, ours_wait_probe, torch_post_probe, torch_wait_probe
from bench.report import md_table, new_figure, out_dir, save_figure, text_table, write_json
from bench.stages import mse
from bench.stats import ratio_samples, summarize
from bench.vs_torch import _build_torch
from dualpipe.launch import makespans, timed

DIM, ROWS = 4, 1


def _stage(stage: int):
    import torch
    torch.manual_seed(100 + stage)
    return torch.nn.Linear(DIM, DIM)


def _bare_costs(iters: int = 300) -> dict:
    """Median seconds of a forward and of a backward of one stage, alone (input that
    requires grad, as on a middle stage), and of a last stage's forward+loss+backward."""
    import torch
    m = _stage(0)
    x = torch.randn(ROWS, DIM, requires_grad=True)
    g = torch.randn(ROWS, DIM)
    t = torch.randn(ROWS, DIM)
    tf, tb, tl = [], [], []
    for i in range(iters + 20):
        t0 = time.perf_counter()
        y = m(x)
        t1 = time.perf_counter()
        y.backward(g)
        t2 = time.perf_counter()
        loss = mse(m(x), t)
        loss.backward()
        t3 = time.perf_counter()
        if i >= 20:
            tf.append(t1 - t0)
            tb.append(t2 - t1)
            tl.append(t3 - t2)
    return {"f": summarize(tf)["median"], "b": summarize(tb)["median"],
            "last_f_loss_b": summarize(tl)["median"]}


def _count_parts(s, rank: int) -> tuple[int, int, int]:
    """(forward parts, backward parts (B or I), W parts) of ``rank``'s actions."""
    nf = nb = nw = 0
    for a in s.actions[rank]:
        for kind, _c, _m in a.parts():
            if kind == "F":
                nf += 1
            elif kind in ("B", "I"):
                nb += 1
            else:
                nw += 1
    return nf, nb, nw


def _torch_parts(sched, rank: int) -> int | None:
    order = getattr(sched, "pipeline_order", None)
    if not order or rank not in order:
        return None
    n = 0
    for a in order[rank]:
        if a is None:
            continue
        subs = getattr(a, "sub_actions", None) or (a,)
        for sa in subs:
            if str(sa.computation_type) in ("F", "B", "I", "W") or sa.computation_type.name in (
                    "FORWARD", "FULL_BACKWARD", "BACKWARD_INPUT", "BACKWARD_WEIGHT"):
                n += 1
    return n


# our variants: label -> (split_linear_weight_grads, transport).  "auto" is the default
# transport: shared memory between ranks of one host; "group" is the process group's
# own backend (gloo here), the transport torch's schedules use.
OURS = {"ours": (True, "auto"), "ours (no W split)": (False, "auto"),
        "ours on gloo": (True, "group"), "ours on gloo (no W split)": (False, "group")}


def _rank_main(rank: int, world: int, cfg: dict):
    import torch

    from dualpipe.schedules import get_schedule
    dev = torch.device("cpu")
    N = cfg["chunks"]
    ours_wait = ours_wait_probe()
    torch_wait = torch_wait_probe()
    ours_post = ours_post_probe()
    torch_post = torch_post_probe()

    def posted(side):
        return (ours_post["send"] + ours_post["recv"]) if side != "torch" else torch_post[0]
    bare = _bare_costs()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(N * ROWS, DIM, generator=g)
    y = torch.randn(N * ROWS, DIM, generator=g)
    sides = {}
    for name in cfg["schedules"]:
        s = get_schedule(name, world, N)
        nf, nb, nw = _count_parts(s, rank)
        for label, (split, transport) in OURS.items():
            kw = {"lookahead": cfg["lookahead"]} if cfg.get("lookahead") else {}
            pipe, _ = build_ours(name, rank, world, N, _stage, timeout=cfg["timeout"],
                                        split_linear_weight_grads=split, transport=transport,
                                        **kw)
            if rank == 0 and pipe.transport != {"auto": "shm", "group": "gloo"}[transport]:
                print(f"[overhead] note: {label!r} runs on {pipe.transport}", flush=True)
            inputs, labels = rank_io(s, rank, x, y, ROWS)
            crit = mse if labels else None

            def run(pipe=pipe, inputs=inputs, labels=labels, crit=crit):
                pipe.step(*inputs, num_chunks=N, criterion=crit, labels=labels)
            sides[(name, label)] = {"run": run, "obj": pipe, "acc": ours_wait,
                                    "parts": nf + nb + (nw if split else 0)}
        built = _build_torch(name, rank, world, N, _stage, dev)
        if built is not None:
            sched, stages, first, last = built

            def run_t(sched=sched, first=first, last=last):
                kw = {"target": y, "losses": []} if last else {}
                sched.step(*((x,) if first else ()), **kw)
            tp = _torch_parts(sched, rank)
            sides[(name, "torch")] = {"run": run_t, "obj": [st.submod for st in stages],
                                      "acc": torch_wait, "parts": nf + nb + nw,
                                      "parts_torch_order": tp}
    samples = {k: [] for k in sides}
    keys = list(sides)
    for rep in range(cfg["warmup"] + cfg["repeats"]):
        order = keys if rep % 2 == 0 else keys[::-1]
        for k in order:
            sd = sides[k]
            objs = sd["obj"] if isinstance(sd["obj"], list) else [sd["obj"]]
            for o in objs:
                o.zero_grad(set_to_none=True)
            w0, p0 = sd["acc"][0], posted(k[1])
            t0, t1, _ = timed(sd["run"])
            if rep >= cfg["warmup"]:
                samples[k].append({"t0": t0, "t1": t1, "wall": t1 - t0,
                                   "wait": sd["acc"][0] - w0, "post": posted(k[1]) - p0})
        if rep % 10 == 9:
            gc.collect()
    profiles = {}
    own_py = {}
    if cfg["profile"]:
        for k in keys:
            prof = cProfile.Profile()
            for i in range(cfg["profile_steps"]):
                timed(lambda: None)
                if rank == cfg["profile_rank"]:
                    prof.enable()
                sides[k]["run"]()
                if rank == cfg["profile_rank"]:
                    prof.disable()
            if rank == cfg["profile_rank"]:
                buf = io.StringIO()
                st = pstats.Stats(prof, stream=buf)
                st.sort_stats("tottime").print_stats(18)
                profiles[f"{k[0]}|{k[1]}"] = buf.getvalue()
                # the runtime's own Python: functions defined in its source files
                # (ours: dualpipe/ and overlap/; torch: distributed/pipelining/ and the
                # Python layer of torch.distributed it calls), not torch ops, autograd or
                # the c10d C++ calls
                own = {}
                for (fname, _line, _fn), (_cc, _nc, tt, _ct, _callers) in st.stats.items():
                    f = fname.replace("\\", "/")
                    if k[1] == "torch":
                        part = ("pipelining" if "/torch/distributed/pipelining/" in f else
                                "c10d python" if f.endswith("distributed_c10d.py") else None)
                    else:
                        part = ("dualpipe" if "/dualpipe/" in f else
                                "overlap" if "/overlap/" in f else None)
                    if part:
                        own[part] = own.get(part, 0.0) + tt
                own_py[f"{k[0]}|{k[1]}"] = {kk: v / cfg["profile_steps"] for kk, v in own.items()}
    out = {"bare": bare, "sides": {}, "profiles": profiles, "own_python_s_per_step": own_py}
    for k, sd in sides.items():
        name, label = k
        s = get_schedule(name, world, N)
        nf, nb, nw = _count_parts(s, rank)
        split = OURS[label][0] if label in OURS else True
        # bare compute of this rank: every stage forward + backward once per micro-batch
        compute = nf * bare["f"] + nb * bare["b"]
        out["sides"][f"{name}|{label}"] = {
            "transport": getattr(sd["obj"], "transport", "gloo (torch)"),
            "samples": samples[k], "parts": sd["parts"], "compute_s": compute,
            "parts_torch_order": sd.get("parts_torch_order"), "w_split": split}
    return out


def analyse(cfg, per_rank):
    res = {"bare_costs_s": [r["bare"] for r in per_rank], "sides": {}, "pairs": {}}
    keys = list(per_rank[0]["sides"])
    for k in keys:
        rows = []
        for rank, r in enumerate(per_rank):
            sd = r["sides"][k]
            wall = summarize([x["wall"] for x in sd["samples"]])
            wait = summarize([x["wait"] for x in sd["samples"]])
            py = summarize([x["wall"] - x["wait"] - sd["compute_s"]
                                   for x in sd["samples"]])
            post = summarize([x["post"] for x in sd["samples"]])
            n = sd["parts"]
            rows.append({"rank": rank, "parts": n, "parts_torch_order": sd["parts_torch_order"],
                         "wall_per_action_us": wall["median"] / n * 1e6,
                         "wait_per_action_us": wait["median"] / n * 1e6,
                         "compute_per_action_us": sd["compute_s"] / n * 1e6,
                         "python_per_action_us": py["median"] / n * 1e6,
                         "python_per_action_iqr_us": py["iqr"] / n * 1e6,
                         "post_per_action_us": post["median"] / n * 1e6,
                         "wall_ms": wall, "wait_ms": wait})
        mk = makespans([[(x["t0"], x["t1"]) for x in r["sides"][k]["samples"]]
                               for r in per_rank])
        res["sides"][k] = {"per_rank": rows, "step_s": summarize(mk), "samples_s": mk}
    for name in cfg["schedules"]:
        t = res["sides"].get(f"{name}|torch")
        o = res["sides"].get(f"{name}|ours")
        if not (t and o):
            continue
        for label in OURS:
            o = res["sides"][f"{name}|{label}"]
            py_o = max(r["python_per_action_us"] for r in o["per_rank"])
            py_t = max(r["python_per_action_us"] for r in t["per_rank"])
            wall_o = max(r["wall_per_action_us"] for r in o["per_rank"])
            wall_t = max(r["wall_per_action_us"] for r in t["per_rank"])
            step_ratio = summarize(ratio_samples(o["samples_s"], t["samples_s"]))
            res["pairs"][f"{name}|{label}"] = {
                "python_per_action_ratio": py_o / py_t,
                "wall_per_action_ratio": wall_o / wall_t,
                "step_ratio": step_ratio,
                "target_met": py_o / py_t <= 0.5}
    return res


def render(cfg, machine, status, res, profiles, out) -> str:
    md = ["# Runtime overhead per compute action (`python -m bench.overhead`)", "",
          f"Machine: {describe_machine(machine)}.", "",
          f"{cfg['ranks']} ranks, {cfg['chunks']} micro-batches of 1 x 4, every stage one "
          f"`nn.Linear(4, 4)`; {cfg['repeats']} timed steps per side after {cfg['warmup']} "
          "warm-up, sides interleaved. Per rank: wall / comm wait / bare compute / python "
          "(= wall - wait - compute: the runtime's own cost, including the backend calls "
          "that enqueue transfers, shown separately as 'posting'), each per executed "
          "compute action (F, B, I, W; F&B = 2), "
          "microseconds, median over steps. Bare compute per stage (alone, same process): "
          + ", ".join(f"rank {i}: F {b['f'] * 1e6:.0f} us, B {b['b'] * 1e6:.0f} us"
                      for i, b in enumerate(res["bare_costs_s"])) + ".", ""]
    if status.get("reason"):
        md += [f"Note: {status['reason']}.", ""]
    headers = ["schedule", "side", "actions/rank", "step ms (median [IQR])",
               "wall/action us (per rank)", "comm wait/action us", "python/action us",
               "of which posting transfers us"]
    rows = []
    for k, v in res["sides"].items():
        name, label = k.split("|")
        st = v["step_s"]
        pr = v["per_rank"]
        rows.append([name, label, "/".join(str(r["parts"]) for r in pr),
                     f"{st['median'] * 1e3:.2f} [{st['iqr'] * 1e3:.2f}]",
                     " / ".join(f"{r['wall_per_action_us']:.0f}" for r in pr),
                     " / ".join(f"{r['wait_per_action_us']:.0f}" for r in pr),
                     " / ".join(f"{r['python_per_action_us']:.0f}" for r in pr),
                     " / ".join(f"{r['post_per_action_us']:.0f}" for r in pr)])
    md += [md_table(headers, rows), ""]
    h2 = ["schedule", "ours variant", "python/action ours / torch (worst rank)",
          "target <= 0.5", "wall/action ours / torch", "step time ours / torch (median [IQR])"]
    r2 = []
    for k, p in res["pairs"].items():
        name, label = k.split("|")
        sr = p["step_ratio"]
        r2.append([name, label, f"{p['python_per_action_ratio']:.3f}",
                   "met" if p["target_met"] else "NOT met", f"{p['wall_per_action_ratio']:.3f}",
                   f"{sr['median']:.3f} [{sr['q1']:.3f}-{sr['q3']:.3f}]"])
    md += [md_table(h2, r2), ""]
    # plot: stacked per-action cost, worst rank
    fig, (ax,) = new_figure(1, 7.5, 4.0)
    labels, comp, wait, py = [], [], [], []
    for k, v in res["sides"].items():
        name, label = k.split("|")
        worst = max(v["per_rank"], key=lambda r: r["wall_per_action_us"])
        labels.append(f"{name}\n{label}")
        comp.append(worst["compute_per_action_us"])
        wait.append(worst["wait_per_action_us"])
        py.append(max(worst["python_per_action_us"], 0.0))
    xs = range(len(labels))
    ax.bar(xs, comp, color="#228833", label="bare compute")
    ax.bar(xs, py, bottom=comp, color="#4477aa", label="python (scheduling)")
    ax.bar(xs, wait, bottom=[c + p for c, p in zip(comp, py)], color="#ccbb44",
           label="comm wait")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("us per compute action (slowest rank, median)")
    ax.legend(fontsize=7)
    ax.set_title(f"per-action cost, {cfg['ranks']} ranks x {cfg['chunks']} micro-batches, "
                 "Linear(4,4) stages", fontsize=9)
    fig.suptitle(f"bench.overhead — {describe_machine(machine)}", fontsize=8)
    save_figure(fig, out / "overhead.png")
    md += ["![per-action cost](overhead.png)", ""]
    own = res.get("own_python_s_per_step") or {}
    if own:
        rows3 = []
        for k, parts in own.items():
            name, label = k.split("|")
            n = res["sides"][k]["per_rank"][0]["parts"]
            tot = sum(parts.values())
            rows3.append([name, label, f"{tot * 1e3:.2f}", f"{tot / n * 1e6:.1f}",
                          ", ".join(f"{p} {v / n * 1e6:.1f}" for p, v in sorted(parts.items()))])
        md += ["The runtimes' own Python (cProfile on rank 0: own time of the functions "
               "defined in the runtime's source -- ours `dualpipe/`, `overlap/`; torch "
               "`torch/distributed/pipelining/` and the Python layer of `torch.distributed` "
               "it calls; not torch ops, autograd or the c10d C++ calls; profiler overhead "
               "included on both sides):", "",
               md_table(["schedule", "side", "ms per step", "us per action", "by part, us per action"],
                               rows3), ""]
    if profiles:
        txt = "\n\n".join(f"==== {k} (rank 0, {cfg['profile_steps']} steps) ====\n{v}"
                          for k, v in profiles.items())
        (out / "overhead_profile.txt").write_text(txt)
        md += ["cProfile of rank 0 (top functions by own time): `overhead_profile.txt`.", ""]
    (out / "overhead.md").write_text("\n".join(md))
    return text_table(["schedule", "side", "step ms", "python/action us",
                              "wait/action us"],
                             [[r[0], r[1], r[3].split()[0], r[6], r[5]] for r in rows]) + \
        "\n\n" + text_table(["schedule", "ours variant", "python ours/torch", "<=0.5"],
                                   [r[:4] for r in r2])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--schedules", nargs="+", default=["dualpipev", "1f1b"],
                   choices=["dualpipev", "1f1b"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--lookahead", type=int, default=None,
                   help="our runtime's lookahead (compute actions whose receives are posted "
                        "ahead; default: the runtime's default)")
    p.add_argument("--profile", action="store_true", help="cProfile rank 0 (extra steps)")
    p.add_argument("--profile-steps", type=int, default=20)
    p.add_argument("--profile-rank", type=int, default=0, help="the rank --profile profiles")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from dualpipe.launch import run_ranks
    out = out_dir(a.out)
    status = torch_pipelining_status()
    machine = machine_info("gloo", threads_per_rank=1)
    cfg = dict(ranks=a.ranks, chunks=a.chunks, schedules=a.schedules, warmup=a.warmup,
               repeats=a.repeats, profile=a.profile, profile_steps=a.profile_steps,
               lookahead=a.lookahead, profile_rank=a.profile_rank,
               timeout=a.timeout)
    t0 = time.perf_counter()
    print(f"[overhead] {a.ranks} ranks, {a.chunks} micro-batches, {', '.join(a.schedules)}: "
          f"{a.warmup} warm-up + {a.repeats} timed steps per side", flush=True)
    per_rank = run_ranks(_rank_main, a.ranks, cfg, threads=1, timeout=max(600.0, a.timeout * 4))
    res = analyse(cfg, per_rank)
    res["own_python_s_per_step"] = per_rank[a.profile_rank]["own_python_s_per_step"]
    profiles = per_rank[a.profile_rank]["profiles"]
    machine["load_avg_1_5_15_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    write_json(out / "overhead.json", {
        "benchmark": "overhead", "machine": machine, "torch_pipelining": status, "config": cfg,
        "units": "per-action figures in microseconds, step times in seconds",
        "wall_s": time.perf_counter() - t0,
        "result": {**res, "sides": {k: {kk: vv for kk, vv in v.items()}
                                    for k, v in res["sides"].items()}},
        "raw": [{k: v for k, v in r.items() if k != "profiles"} for r in per_rank]})
    table = render(cfg, machine, status, res, profiles, out)
    print(f"[overhead] wrote {out / 'overhead.json'}, overhead.md, overhead.png "
          f"({time.perf_counter() - t0:.0f} s)")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
