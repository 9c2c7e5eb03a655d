"""How long the *caller* of a gloo send is blocked, with and without the receive posted.

Our runtime posts receives ahead of the compute that needs them (``lookahead``), so the
sender's ``ProcessGroupGloo.send`` usually finds the matching receive already posted.
gloo's TCP transport then writes the payload on the calling thread, inside the send call;
when the receive is not posted yet, the send is queued and written later by gloo's own
thread.  This measures the median time of the send call for both cases and a few sizes
(2 ranks, a private ``ProcessGroupGloo`` as the runtime uses).

    python -m bench.gloo_send

Writes ``gloo_send.json`` and ``gloo_send.md`` under ``bench/results/`` (or ``--out``).
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time

from bench import common


def _rank_main(rank: int, world: int, cfg: dict):
    import torch
    import torch.distributed as dist
    store = dist.distributed_c10d._get_default_store()
    pg = dist.ProcessGroupGloo(dist.PrefixStore("gloo_send", store), rank, world,
                               datetime.timedelta(seconds=60))
    n = cfg["iters"]
    out = {}
    for nbytes in cfg["sizes"]:
        numel = max(1, nbytes // 4)
        for pre in (True, False):
            dist.barrier()
            if rank == 1:
                bufs = [torch.empty(numel) for _ in range(n)]
                if pre:
                    hs = [pg.recv([b], 0, 0) for b in bufs]
                    dist.barrier()
                else:
                    dist.barrier()
                    time.sleep(0.05)          # the sender is done before we post
                    hs = [pg.recv([b], 0, 0) for b in bufs]
                for h in hs:
                    h.wait()
                dist.barrier()
            else:
                t = torch.ones(numel)
                dist.barrier()
                time.sleep(0.01)
                ts, hs = [], []
                for _ in range(n):
                    t0 = time.perf_counter()
                    hs.append(pg.send([t], 1, 0))
                    ts.append(time.perf_counter() - t0)
                for h in hs:
                    h.wait()
                dist.barrier()
                out[(numel * 4, pre)] = {"median_us": statistics.median(ts) * 1e6,
                                         "min_us": min(ts) * 1e6}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gloo_send", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[16, 32 << 10, 1 << 20],
                   help="message sizes in bytes")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from dualpipe.launch import run_ranks
    out = common.out_dir(a.out)
    machine = common.machine_info("gloo", threads_per_rank=1)
    res = run_ranks(_rank_main, 2, {"sizes": a.sizes, "iters": a.iters}, threads=1)[0]
    rows = []
    for size in a.sizes:
        pre, late = res[(max(1, size // 4) * 4, True)], res[(max(1, size // 4) * 4, False)]
        rows.append([size, f"{pre['median_us']:.1f}", f"{late['median_us']:.1f}",
                     f"{pre['median_us'] / late['median_us']:.1f}x"])
    headers = ["bytes", "send call, receive already posted (us, median)",
               "send call, receive posted later (us, median)", "ratio"]
    common.write_json(out / "gloo_send.json", {
        "benchmark": "gloo_send", "machine": machine, "iters": a.iters,
        "rows": [dict(zip(["bytes", "posted_us", "not_posted_us", "ratio"], r)) for r in rows]})
    (out / "gloo_send.md").write_text("\n".join([
        "# Time the caller of a gloo send is blocked (`python -m bench.gloo_send`)", "",
        f"Machine: {common.describe_machine(machine)}.", "",
        common.md_table(headers, rows), ""]))
    print(common.text_table(["bytes", "posted us", "not posted us", "ratio"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
