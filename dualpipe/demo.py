"""``python -m dualpipe demo``: train a small model with a pipeline schedule on local ranks.

Spawns ``--ranks`` processes (gloo on CPU; NCCL, one GPU per rank, when enough GPUs are
present), trains a stack of residual MLP stages to imitate a fixed random "teacher"
network, and:

1. checks the first step against a single-process run of the same micro-batches on
   the same kind of device (CPU for gloo; ``cuda:0`` for NCCL, where rank 0 ran): losses
   bit for bit, gradients (summed over the ranks holding a stage) by cosine distance,
   and says what it compared;
2. prints the loss as it falls, step by step;
3. writes the last step's measured timeline as a PNG and a Chrome trace, and prints the
   measured idle time per rank beside the simulator's prediction for the measured
   per-action costs.
"""
from __future__ import annotations

import argparse
import json
import os
import time

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .schedules import SCHEDULES
    p.add_argument("--schedule", default="dualpipe", choices=sorted(SCHEDULES))
    p.add_argument("--ranks", type=int, default=4, help="pipeline ranks (processes)")
    p.add_argument("--chunks", type=int, default=None,
                   help="micro-batches per step (default: 2 x ranks x 2)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dim", type=int, default=64, help="hidden size of every stage")
    p.add_argument("--micro-batch", type=int, default=16, help="rows per micro-batch")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    p.add_argument("--transport", choices=["auto", "shm", "group"], default="auto",
                   help="how stages talk: auto = shared memory between CPU ranks of this host "
                        "(else the process group's backend), shm = require it, group = the "
                        "process group's gloo/NCCL (docs/transport.md)")
    p.add_argument("--out", default="out/demo", help="directory for the timeline PNG/trace")
    p.add_argument("--timeout", type=float, default=120.0,
                   help="seconds any rank may wait for another before failing")


def _make_stage(stage: int, dim: int):
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 2 * dim)
            self.fc2 = nn.Linear(2 * dim, dim)

        def forward(self, x):
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))

    torch.manual_seed(1234 + stage)
    return Block()


def _teacher_batch(step: int, n: int, dim: int):
    import torch
    g = torch.Generator().manual_seed(99)
    w1 = torch.randn(dim, dim, generator=g) / dim ** 0.5
    w2 = torch.randn(dim, dim, generator=g) / dim ** 0.5
    g.manual_seed(1000 + step)
    x = torch.randn(n, dim, generator=g)
    y = torch.tanh(x @ w1) @ w2
    return x, y


def _criterion(out, label):
    import torch.nn.functional as Fn
    return Fn.mse_loss(out, label)


def _num_stages(schedule: str, ranks: int) -> int:
    from .schedules import placement_schedule
    return placement_schedule(schedule, ranks).num_stages


def _rank_main(rank: int, world: int, cfg: dict):
    import torch
    import torch.distributed as dist

    from . import Pipeline, reduce_dualpipe_grads
    from .schedules import get_schedule
    name, N, dim, mb = cfg["schedule"], cfg["chunks"], cfg["dim"], cfg["micro_batch"]
    dev = torch.device("cuda", rank) if cfg["backend"] == "nccl" else torch.device("cpu")
    s = get_schedule(name, world, N)
    mods = [_make_stage(stage, dim).to(dev) for (_st, stage) in s.placement[rank]]
    pipe = Pipeline(mods, schedule=name, timeout=cfg["timeout"], transport=cfg["transport"])
    if rank == 0:
        why = ""
        if pipe.transport == "shm":
            why = " (shared memory between the ranks of this host)"
        elif pipe.transport == "gloo" and cfg["transport"] == "auto":
            from overlap import build_hint, build_info
            hint = build_hint(build_info())
            why = (" (shared memory unavailable: " + hint + ")") if hint else \
                " (shared memory unavailable; DUALPIPE_TRANSPORT or another host?)"
        print(f"[demo] stage boundaries travel over {pipe.transport}{why}", flush=True)
    opt = torch.optim.SGD(pipe.parameters(), lr=cfg["lr"])
    first = {}
    history = []
    for step in range(cfg["steps"]):
        x, y = _teacher_batch(step, N * mb, dim)
        x, y = x.to(dev), y.to(dev)
        ins, outs = s.input_microbatches(rank), s.loss_microbatches(rank)
        inputs = () if ins is None else (x[ins.start * mb:ins.stop * mb],)
        labels = () if outs is None else (y[outs.start * mb:outs.stop * mb],)
        loss_rows = None if outs is None else (outs.start, outs.stop)
        opt.zero_grad(set_to_none=True)
        loss, _ = pipe.step(*inputs, num_chunks=N, criterion=_criterion if labels else None,
                            labels=labels)
        if step == 0:
            first = {"loss": None if loss is None else loss.cpu(), "loss_rows": loss_rows,
                     "grads": {stage: {n: p.grad.detach().cpu().clone()
                                       for n, p in pipe.module[c].named_parameters()}
                               for c, (_st, stage) in enumerate(s.placement[rank])}}
        reduce_dualpipe_grads(pipe)
        opt.step()
        total = torch.zeros(2, dtype=torch.float64, device=dev)
        if loss is not None:
            total[0], total[1] = loss.double().sum(), loss.numel()
        dist.all_reduce(total)
        mean = (total[0] / total[1]).item()
        history.append(mean)
        if rank == 0:
            print(f"  step {step:3d}  loss {mean:.5f}  ({pipe.last_stats.wall * 1e3:.1f} ms)",
                  flush=True)
    tl = [(iv.start, iv.end, str(iv.action), iv.lane) for iv in pipe.timeline]
    st = pipe.last_stats
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    return {"first": first, "history": history, "timeline": tl,
            "device": str(dev), "device_name": device_name,
            "stats": {"wall": st.wall, "busy": st.busy, "wait": st.wait,
                      "peak": st.peak_activations}}


def _reference_first_step(cfg: dict, device):
    """Single process on ``device``: the first step's per-micro-batch losses and stage
    grads (returned on the CPU), the same stages, data and micro-batches as the ranks."""
    import torch
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the ranks (run_ranks threads=1): same CPU kernels
    try:
        S, N, mb, dim = (_num_stages(cfg["schedule"], cfg["ranks"]), cfg["chunks"],
                         cfg["micro_batch"], cfg["dim"])
        stages = [_make_stage(i, dim).to(device) for i in range(S)]
        x, y = _teacher_batch(0, N * mb, dim)
        x, y = x.to(device), y.to(device)
        losses = []
        for i in range(N):
            h = x[i * mb:(i + 1) * mb]
            for st in stages:
                h = st(h)
            loss = _criterion(h, y[i * mb:(i + 1) * mb])
            loss.backward()
            losses.append(loss.detach())
        grads = {i: {n: p.grad.detach().cpu() for n, p in st.named_parameters()}
                 for i, st in enumerate(stages)}
        return torch.stack(losses).cpu(), grads
    finally:
        torch.set_num_threads(threads)


#: Gradients of the pipelined step against the single-process one (cosine distance).
GRAD_TOLERANCE = 1e-13


def _reference_device(backend: str):
    import torch
    return torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")


def _check_first_step(cfg, results) -> dict:
    """Compare step 0 of the ranks with :func:`_reference_first_step` on the reference
    device; return what was compared and the numbers (``matches``: losses bitwise equal
    and every gradient within :data:`GRAD_TOLERANCE`)."""
    import torch

    from .utils import cosine_distance
    device = _reference_device(cfg["backend"])
    ref_losses, ref_grads = _reference_first_step(cfg, device)
    equal, compared, max_diff = True, 0, 0.0
    for r in results:
        f = r["first"]
        if f["loss_rows"] is not None:
            a, b = f["loss_rows"]
            mine, ref = f["loss"], ref_losses[a:b]
            equal &= bool(torch.equal(mine, ref))
            compared += ref.numel()
            max_diff = max(max_diff, float((mine.double() - ref.double()).abs().max()))
    total: dict = {}
    for r in results:
        for stage, g in r["first"]["grads"].items():
            acc = total.setdefault(stage, {})
            for n, t in g.items():
                acc[n] = acc[n] + t if n in acc else t.clone()
    dists = [cosine_distance(total[stage][n], t)
             for stage, ref in ref_grads.items() for n, t in ref.items()]
    worst = max(dists)
    ref_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rank_devices = [f"{r.get('device', '?')} ({r.get('device_name', '?')})" for r in results]
    return {
        "reference": f"one process, all {len(ref_grads)} stages on {device} ({ref_name}), "
                     f"the same {cfg['chunks']} micro-batches of step 0",
        "reference_device": str(device), "reference_device_name": ref_name,
        "rank_devices": rank_devices,
        "same_device": all(r.get("device") == str(device) for r in results),
        "losses_compared": compared, "losses_of": cfg["chunks"],
        "losses_bitwise_equal": equal, "loss_max_abs_diff": max_diff,
        "grad_tensors_compared": len(dists), "worst_grad_cosine_distance": worst,
        "grad_tolerance": GRAD_TOLERANCE,
        "matches": bool(equal and compared == cfg["chunks"] and worst < GRAD_TOLERANCE),
    }


def _describe_check(c: dict) -> str:
    where = c["reference_device"] + ("" if c["reference_device"] == "cpu"
                                     else f" ({c['reference_device_name']})")
    ranks = "" if c["same_device"] else f"; ranks ran on {', '.join(c['rank_devices'])}"
    losses = ("bit-identical" if c["losses_bitwise_equal"]
              else f"DIFFER (max |diff| {c['loss_max_abs_diff']:.3g})")
    grads = "ok" if c["worst_grad_cosine_distance"] < c["grad_tolerance"] else \
        f"ABOVE {c['grad_tolerance']:.0e}"
    return (f"step 0 vs single-process reference on {where}{ranks}: losses {losses} "
            f"({c['losses_compared']} of {c['losses_of']} micro-batches), worst gradient "
            f"cosine distance {c['worst_grad_cosine_distance']:.1e} over "
            f"{c['grad_tensors_compared']} tensors ({grads})")


def run(args: argparse.Namespace) -> int:
    from .draw import MissingDrawDependency, draw
    from .launch import BackendError, check_backend, run_ranks
    from .schedules import get_schedule, parse_action
    from .simulate import Interval, simulate
    backend = args.backend
    if backend == "auto":
        try:
            check_backend("nccl", args.ranks)
            backend = "nccl"
        except BackendError:
            backend = "gloo"
    check_backend(backend, args.ranks)  # "NCCL needs CUDA GPUs: ..." before spawning
    if backend == "nccl":
        # cuBLAS is bitwise reproducible across streams only with a fixed workspace; set
        # before any process (ranks, and this one for the reference) creates a handle
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    chunks = args.chunks or 4 * args.ranks
    get_schedule(args.schedule, args.ranks, chunks)  # argument errors before spawning
    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    cfg = dict(schedule=args.schedule, ranks=args.ranks, chunks=chunks, steps=args.steps,
               dim=args.dim, micro_batch=args.micro_batch, lr=args.lr, backend=backend,
               timeout=args.timeout, transport=args.transport)
    device = "CUDA/NCCL, one GPU per rank" if backend == "nccl" else "CPU/gloo"
    print(f"[demo] {args.schedule}: {args.ranks} ranks ({device}), {chunks} micro-batches of "
          f"{args.micro_batch} rows, {_num_stages(args.schedule, args.ranks)} stages of dim "
          f"{args.dim}, {args.steps} steps", flush=True)
    t0 = time.perf_counter()
    results = run_ranks(_rank_main, args.ranks, cfg, backend=backend,
                        timeout=max(600.0, args.timeout * 4))
    print(f"[demo] trained in {time.perf_counter() - t0:.1f} s", flush=True)
    check = _check_first_step(cfg, results)
    ok = check["matches"]
    print(f"[demo] {_describe_check(check)}", flush=True)
    hist = results[0]["history"]
    print(f"[demo] loss {hist[0]:.5f} -> {hist[-1]:.5f} over {len(hist)} steps "
          f"({'falling' if hist[-1] < hist[0] else 'NOT falling'})", flush=True)
    # measured timeline of the last step
    intervals = [Interval(r, a, b, parse_action(t), lane)
                 for r, res in enumerate(results) for (a, b, t, lane) in res["timeline"]]
    s = get_schedule(args.schedule, args.ranks, chunks)
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, f"{args.schedule}_timeline.png")
    trace = os.path.join(args.out, f"{args.schedule}_trace.json")
    try:
        draw(png, intervals, s, title=f"{args.schedule}: measured last step ({device})",
             time_unit="s")
    except MissingDrawDependency as e:  # the training and its checks stand without a PNG
        print(f"[demo] no PNG: {e}")
        png = None
    draw(trace, intervals, s)
    # simulated prediction for the measured mean costs
    costs = _measured_costs(intervals)
    sim = simulate(s, costs)
    print(f"[demo] wrote {png + ' and ' if png else ''}{trace}")
    print("[demo] last step, per rank (ms):   measured idle | simulated idle (measured costs)")
    for r, res in enumerate(results):
        st = res["stats"]
        print(f"         rank {r}: wall {st['wall'] * 1e3:7.2f}  busy {st['busy'] * 1e3:7.2f}  "
              f"idle {(st['wall'] - st['busy']) * 1e3:7.2f} | {sim.idle[r] * 1e3:7.2f}   "
              f"peak activations {st['peak']} (simulated {sim.peak_activations[r]})")
    print(f"[demo] measured costs (ms): F {costs.f * 1e3:.3f}  B {costs.b * 1e3:.3f}  "
          f"W {costs.w * 1e3:.3f}  F&B {costs.pair * 1e3:.3f}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"config": cfg, "loss_history": hist, "first_step_matches": ok,
                   "first_step_check": check,
                   "stats": [r["stats"] for r in results],
                   "simulated_idle": sim.idle}, f, indent=1)
    return 0 if ok and hist[-1] < hist[0] else 1


def _measured_costs(intervals):
    """The mean measured cost of each kind of action, as a :class:`simulate.Costs`."""
    from .simulate import Costs
    sums: dict[str, list[float]] = {}
    for iv in intervals:
        if iv.lane == "compute":
            sums.setdefault(iv.action.kind, []).append(iv.end - iv.start)

    def mean(k, default=0.0):
        v = sums.get(k)
        return sum(v) / len(v) if v else default
    f = mean("F")
    b_full = mean("B")
    i_part = mean("I")
    w = mean("W")
    if not b_full:
        b_full = i_part + w
    w = min(w, b_full)
    return Costs(f=f, b=b_full, w=w, fb=mean("FB", f + b_full) or None)
