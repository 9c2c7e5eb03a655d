"""The same overlapped F&B inside torch.distributed.pipelining's ScheduleDualPipeV.

Run from the repository root (needs a torch whose ``torch.distributed.pipelining`` has
``ScheduleDualPipeV``; the script says so and exits otherwise)::

    python examples/torch_pipelining_adapter.py            # 2 CPU ranks, gloo, 4 stages

Each rank holds two :class:`examples.moe_block.MoEBlock` stages of a V (rank ``r``:
stages ``r`` and ``2R-1-r``; an expert group of one rank, so the all-to-alls are local
copies, delayed with ``--delay-ms`` to stand in for a slow network).  The
schedule runs twice on the same data: torch's default ``OVERLAP_F_B`` (forward, then
backward) and with :func:`overlap.adapters.register_overlapped_forward_backward`, which
interleaves the forward's and the backward's sub-stages.  It prints whether losses and
gradients match, how many pairs went through the adapter, and the hidden-communication
fraction of those pairs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict
from typing import Any, Sequence

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from examples.moe_block import (ExpertGroup, MoEBlock, MoEConfig,  # noqa: E402
                                canonical_grads, cosine_distance, criterion, fb_window_stats)
from overlap.adapters import (register_overlapped_forward_backward,  # noqa: E402
                              torch_overlap_support)
from overlap.timeline import Timeline  # noqa: E402

__all__ = ["rank_main", "reference", "main"]


def _data(cfg: MoEConfig, n: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed + 99)
    shape = (n * batch, cfg.seq, cfg.dim)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g) * 0.5


def rank_main(rank: int, world: int, opts: dict) -> dict:
    """Run ScheduleDualPipeV plain and with the adapter (same modules' weights, same
    data); return losses (rank 0), per-stage gradients, adapter counters, overlap."""
    from torch.distributed.pipelining import PipelineStage
    from torch.distributed.pipelining.schedules import ScheduleDualPipeV

    cfg = MoEConfig(**opts["cfg"])
    n, batch = opts["chunks"], opts["batch"]
    num_stages = 2 * world
    x, y = _data(cfg, n, batch)
    out: dict[str, Any] = {"rank": rank}
    for mode in opts["modes"]:
        delay = opts["delay_ms"] / 1e3
        ids = (rank, num_stages - 1 - rank)
        mods = [MoEBlock(cfg, s, ExpertGroup(comm_delay_s=delay)) for s in ids]
        # "fallback": the same blocks inside nn.Sequential, a class without
        # overlapped_forward_backward: the adapter must run those pairs plainly
        subs = [torch.nn.Sequential(m) for m in mods] if mode == "fallback" else mods
        stages = []
        for s, m in zip(ids, subs):
            example_in = torch.zeros(batch, cfg.seq, cfg.dim, requires_grad=s != 0)
            example_out = torch.zeros(batch, cfg.seq, cfg.dim, requires_grad=True)
            stages.append(PipelineStage(m, s, num_stages, torch.device("cpu"),
                                        input_args=(example_in,), output_args=(example_out,)))
        sched = ScheduleDualPipeV(stages, n_microbatches=n, loss_fn=criterion,
                                  scale_grads=False)
        adapter = register_overlapped_forward_backward(sched) if mode != "plain" else None
        for measured in (False, True):  # a warm-up step (connections, caches), then one
            for m in mods:
                m.zero_grad(set_to_none=True)
            if adapter is not None:
                adapter.calls = adapter.plain = 0
            losses: list[torch.Tensor] = []
            tl = Timeline(rank=rank, enabled=measured)
            t0 = time.perf_counter()
            with tl.activate():
                if rank == 0:  # V: rank 0 holds the first and the last stage
                    sched.step(x, target=y, losses=losses)
                else:
                    sched.step()
            wall = time.perf_counter() - t0
        sub = [(iv.start, iv.end, str(iv.action), iv.lane) for iv in tl.intervals()]
        out[mode] = {
            "losses": torch.stack([v.detach() for v in losses]) if losses else None,
            "grads": {s: canonical_grads(m) for s, m in zip(ids, mods)},
            "calls": adapter.calls if adapter else 0,
            "plain": adapter.plain if adapter else 0,
            "reason": adapter.last_reason if adapter else "",
            "windows": fb_window_stats(sub, []), "wall_s": wall}
    return out


def reference(cfg: MoEConfig, num_stages: int, n: int, batch: int
              ) -> tuple[torch.Tensor, dict[int, dict[str, torch.Tensor]]]:
    """One process: every micro-batch through the chain of stages, loss backward per
    micro-batch.  Returns the losses and each stage's gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mods = [MoEBlock(cfg, s, ExpertGroup()) for s in range(num_stages)]
        x, y = _data(cfg, n, batch)
        losses = []
        for m in range(n):
            h = x[m * batch:(m + 1) * batch]
            for mod in mods:
                h = mod(h)
            loss = criterion(h, y[m * batch:(m + 1) * batch])
            loss.backward()
            losses.append(loss.detach())
        return torch.stack(losses), {s: canonical_grads(m) for s, m in enumerate(mods)}
    finally:
        torch.set_num_threads(threads)


def compare(results: list[dict], ref: tuple | None = None) -> dict:
    """Plain vs overlap (and vs fallback when run): losses bitwise, worst gradient
    cosine distance, bitwise gradients; all vs the reference when given."""
    r0 = results[0]
    out: dict[str, Any] = {
        "loss_bitwise": torch.equal(r0["plain"]["losses"], r0["overlap"]["losses"]),
        "calls": [r["overlap"]["calls"] for r in results],
        "plain_pairs": [r["overlap"]["plain"] for r in results],
        "reasons": [r["overlap"]["reason"] for r in results]}
    worst, bitwise = 0.0, True
    for r in results:
        for s, gs in r["plain"]["grads"].items():
            for k, g in gs.items():
                h = r["overlap"]["grads"][s][k]
                worst = max(worst, cosine_distance(g, h))
                bitwise &= torch.equal(g, h)
    out["grad_cos_max"], out["grad_bitwise"] = worst, bitwise
    if "fallback" in r0:
        out["fallback_calls"] = [r["fallback"]["calls"] for r in results]
        out["fallback_plain_pairs"] = [r["fallback"]["plain"] for r in results]
        out["fallback_reason"] = r0["fallback"]["reason"]
        out["fallback_loss_bitwise"] = torch.equal(r0["plain"]["losses"],
                                                   r0["fallback"]["losses"])
        out["fallback_grad_bitwise"] = all(
            torch.equal(g, r["fallback"]["grads"][s][k]) for r in results
            for s, gs in r["plain"]["grads"].items() for k, g in gs.items())
    if ref is not None:
        ref_losses, ref_grads = ref
        out["ref_loss_bitwise"] = all(torch.equal(r0[m]["losses"], ref_losses)
                                      for m in ("plain", "overlap"))
        out["ref_grad_cos_max"] = max(
            cosine_distance(r[m]["grads"][s][k], ref_grads[s][k])
            for r in results for m in ("plain", "overlap")
            for s, gs in r[m]["grads"].items() for k in gs)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--chunks", type=int, default=8, help="micro-batches (>= 2 * ranks)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--delay-ms", type=float, default=2.0,
                   help="artificial latency of each (local) all-to-all, both runs")
    a = p.parse_args(argv)
    ok, why = torch_overlap_support()
    if not ok:
        print(f"skipped: {why}")
        return {"skipped": why}
    if a.chunks < 2 * a.ranks:
        p.error(f"--chunks must be >= 2 * ranks = {2 * a.ranks} (ScheduleDualPipeV)")
    cfg = MoEConfig(dim=a.dim, seq=a.seq, ffn=a.ffn)
    opts = {"cfg": asdict(cfg), "chunks": a.chunks, "batch": a.batch,
            "delay_ms": a.delay_ms, "modes": ["plain", "overlap"]}
    from dualpipe.launch import run_ranks
    results = run_ranks(rank_main, a.ranks, opts, timeout=300)
    res = compare(results, reference(cfg, 2 * a.ranks, a.chunks, a.batch))
    ws = [w for r in results for w in r["overlap"]["windows"]]
    comm = sum(w["comm_s"] for w in ws)
    hidden = sum(w["hidden_s"] for w in ws)
    print(f"ScheduleDualPipeV, {a.ranks} ranks x 2 MoE stages, {a.chunks} micro-batches "
          f"(torch {torch.__version__})")
    print(f"  OVERLAP_F_B pairs through the adapter per rank: {res['calls']}, "
          f"run plainly: {res['plain_pairs']}")
    print(f"  losses bitwise equal to torch's default path: {res['loss_bitwise']}; "
          f"gradients bitwise {res['grad_bitwise']}, max cosine distance "
          f"{res['grad_cos_max']:.1e}")
    print(f"  vs single-process reference: losses bitwise {res['ref_loss_bitwise']}, max "
          f"gradient cosine distance {res['ref_grad_cos_max']:.1e}")
    if ws:
        fr = [w["hidden_fraction"] for w in ws if w["comm_s"] > 0]
        print(f"  adapter pairs (all-to-all delay {a.delay_ms:g} ms): hidden fraction "
              f"{hidden / comm if comm else 1.0:.1%} (median pair "
              f"{statistics.median(fr) if fr else 1.0:.1%}), "
              f"mean pair {statistics.mean(w['wall_s'] for w in ws) * 1e3:.2f} ms")
    walls = {m: max(r[m]["wall_s"] for r in results) for m in ("plain", "overlap")}
    res["step_wall_s"] = walls
    print(f"  step wall (slowest rank): torch default {walls['plain'] * 1e3:.1f} ms, with the "
          f"adapter {walls['overlap'] * 1e3:.1f} ms")
    return res


if __name__ == "__main__":
    r = main()
    ok = "skipped" in r or (r["loss_bitwise"] and r["grad_cos_max"] < 1e-13
                            and min(r["calls"]) > 0)
    sys.exit(0 if ok else 1)
