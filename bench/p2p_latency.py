"""Transport latency: a message's round trip and a small all_gather, on each transport.

In the same processes, alternating transports every round:

* ``shm``  -- :class:`overlap.shm.ShmP2P` (our default between CPU ranks of one host);
* ``gloo`` -- :class:`overlap.p2p.P2P` over a private ``ProcessGroupGloo`` (what the
  runtime uses across hosts with ``transport="group"``; the transport torch's
  schedules use).

Rank 0 and rank 1 ping-pong a message of ``--floats`` float32 (one tensor, as a pipeline
boundary): one-way latency = round trip / 2.  Then every rank runs ``all_gather`` of 12
int64 (the runtime's step handshake) over ``--ranks`` ranks.  Medians over
``--repeats`` rounds of ``--iters`` operations; writes ``p2p_latency.json``/``.md``.

    python -m bench.p2p_latency                  # 2 ranks
    python -m bench.p2p_latency --ranks 4 --floats 65536
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

from bench.machine import describe_machine, machine_info
from bench.report import md_table, out_dir, text_table, write_json
from bench.stats import summarize


def _rank_main(rank: int, world: int, cfg: dict) -> dict:
    import torch
    import torch.distributed as dist

    from overlap.p2p import P2P
    from overlap.shm import ShmP2P
    to = datetime.timedelta(seconds=cfg["timeout"])
    store = dist.distributed_c10d._get_default_store()
    shm = ShmP2P.create(store, "bench/p2p_latency", rank, world, mode="shm",
                        timeout=cfg["timeout"])
    pg = dist.ProcessGroupGloo(dist.PrefixStore("bench/p2p_latency/gloo", store), rank, world,
                               to)
    sides = {"shm": shm, "gloo": P2P(backend=pg, rank=rank)}
    msg = torch.randn(cfg["floats"])
    buf = torch.empty_like(msg)
    hs = torch.arange(12, dtype=torch.int64)
    out: dict = {k: {"rtt": [], "gather": []} for k in sides}
    for rnd in range(cfg["warmup"] + cfg["repeats"]):
        order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
        for name in order:
            p = sides[name]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(cfg["iters"]):
                if rank == 0:
                    p.isend([msg], 1, "ping", 1).wait(to)
                    p.irecv([buf], 1, "pong", 2).wait(to)
                elif rank == 1:
                    p.irecv([buf], 0, "ping", 1).wait(to)
                    p.isend([buf], 0, "pong", 2).wait(to)
            rtt = (time.perf_counter() - t0) / cfg["iters"]
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(cfg["iters"]):
                p.all_gather(hs, world, "handshake").wait(to)
            gather = (time.perf_counter() - t0) / cfg["iters"]
            if rnd >= cfg["warmup"]:
                out[name]["rtt"].append(rtt)
                out[name]["gather"].append(gather)
    shm.close()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.p2p_latency", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--floats", type=int, default=16, help="float32 per message")
    p.add_argument("--iters", type=int, default=200, help="operations per timed round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.ranks < 2:
        raise SystemExit("--ranks must be >= 2 (rank 0 and 1 ping-pong)")
    from dualpipe.launch import run_ranks
    out = out_dir(a.out)
    machine = machine_info("gloo", threads_per_rank=1)
    cfg = dict(ranks=a.ranks, floats=a.floats, iters=a.iters, warmup=a.warmup,
               repeats=a.repeats, timeout=a.timeout)
    t0 = time.perf_counter()
    print(f"[p2p_latency] {a.ranks} ranks, {a.floats} float32 per message, "
          f"{a.repeats} x {a.iters} operations per transport", flush=True)
    per_rank = run_ranks(_rank_main, a.ranks, cfg, threads=1, timeout=max(600.0, a.timeout * 4))
    res = {}
    for name in per_rank[0]:
        rtt = summarize(per_rank[0][name]["rtt"])
        # an all_gather ends when the slowest rank's ends: the max over ranks per round
        gath = summarize([max(r[name]["gather"][i] for r in per_rank)
                                 for i in range(a.repeats)])
        res[name] = {"one_way_us": rtt["median"] / 2 * 1e6, "rtt_us": rtt["median"] * 1e6,
                     "rtt_iqr_us": rtt["iqr"] * 1e6, "all_gather_us": gath["median"] * 1e6,
                     "all_gather_iqr_us": gath["iqr"] * 1e6}
    machine["load_avg_1_5_15_end"] = [round(x, 2) for x in __import__("os").getloadavg()]
    write_json(out / "p2p_latency.json", {
        "benchmark": "p2p_latency", "machine": machine, "config": cfg,
        "units": "microseconds (medians over rounds)", "wall_s": time.perf_counter() - t0,
        "result": res, "raw": per_rank})
    headers = ["transport", "one way us", "round trip us [IQR]", "all_gather of 12 int64 us [IQR]"]
    rows = [[k, f"{v['one_way_us']:.1f}", f"{v['rtt_us']:.1f} [{v['rtt_iqr_us']:.1f}]",
             f"{v['all_gather_us']:.1f} [{v['all_gather_iqr_us']:.1f}]"] for k, v in res.items()]
    md = ["# Transport latency (`python -m bench.p2p_latency`)", "",
          f"Machine: {describe_machine(machine)}.", "",
          f"{a.ranks} ranks; rank 0 and rank 1 ping-pong one tensor of {a.floats} float32; "
          f"every rank runs all_gather of 12 int64 (the runtime's step handshake). Medians "
          f"over {a.repeats} rounds of {a.iters} operations, transports alternating per "
          "round. shm = overlap.shm.ShmP2P; gloo = overlap.p2p.P2P over a private "
          "ProcessGroupGloo.", "", md_table(headers, rows), ""]
    (out / "p2p_latency.md").write_text("\n".join(md))
    print(f"[p2p_latency] wrote {out / 'p2p_latency.json'}, p2p_latency.md "
          f"({time.perf_counter() - t0:.0f} s)")
    print(text_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
