"""Per-GPU overlap efficiency: a compute kernel and a communication kernel side by side.

CUDA only.  On a machine without CUDA it prints that it needs CUDA, writes nothing and
exits 0.

One process, one GPU.  Compute kernels (on the compute stream of an
``overlap.streams.StreamPair``):

* ``cublas``      ``torch.matmul`` of two ``M x M`` bf16 matrices (cuBLAS; uses all SMs
                  whatever the split says -- it shows the interference);
* ``persistent``  ``overlap.kernels.persistent_matmul(a, b, num_sms=total - comm_sms)`` (a
                  persistent Triton GEMM whose grid is its SM budget), when triton works.

Communication kernels (on the pair's high-priority comm stream):

* ``nccl_a2a``    ``all_to_all_single`` of ``--comm-mib`` MiB on a 1-rank NCCL group whose
                  communicator is capped at ``comm_sms`` CTAs
                  (``overlap.partition.nccl_process_group_options(max_ctas=...)``);
* ``sm_copy``     the extension's SM-budgeted copy ``overlap._ext.sm_copy_(dst, src,
                  num_sms=comm_sms)``, when the CUDA build is loaded;
* ``ce_memcpy``   a device -> pinned-host copy, done by a copy engine (0 SMs).

For every pair and every comm SM budget in ``--comm-sms`` (default 0 8 16 20 24 32; 0 =
no split: compute on every SM, comm kernels at their default size, which for NCCL means
its default CTA count) it measures, with CUDA events, median of ``--iters``:

* ``T_comp`` compute alone, ``T_comm`` communication alone, ``T_both`` both launched
  together (comm first, as TransformerEngine does, so the compute kernel cannot starve it);
* ``overlap_efficiency`` = (T_comp + T_comm - T_both) / min(T_comp, T_comm) (1.0: the
  shorter one was completely hidden) and ``hidden_fraction`` = (T_comp + T_comm - T_both)
  / T_comm, from ``overlap.timeline``;
* the best split: the comm budget with the smallest ``T_both`` per pair.

    python -m bench.overlap_gpu                       # H100/H200-sized defaults
    python -m bench.overlap_gpu --m 4096 --comm-mib 128 --comm-sms 8 20 --iters 20

Writes ``overlap_gpu.json``, ``overlap_gpu.md``, ``overlap_gpu.png`` under ``bench/results/``.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

from bench import common


def _median_ms(fn, stream_sync, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` (which records its own start/end events and returns
    them) over ``iters`` runs after ``warmup`` (a device sync between runs)."""
    import torch
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        start, end = fn()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


class _Comm:
    """One communication kernel kind at one SM budget; ``launch()`` issues it on the
    current stream."""

    def __init__(self, kind: str, comm_sms: int, nbytes: int, device, groups: dict):
        import torch
        import torch.distributed as dist
        self.kind, self.comm_sms = kind, comm_sms
        n = nbytes // 2
        self.src = torch.randn(n, device=device, dtype=torch.bfloat16)
        if kind == "ce_memcpy":
            self.dst = torch.empty(n, dtype=torch.bfloat16, pin_memory=True)
        else:
            self.dst = torch.empty_like(self.src)
        if kind == "nccl_a2a":
            key = comm_sms
            if key not in groups:
                opts = None
                if comm_sms > 0:
                    from overlap.partition import nccl_process_group_options
                    opts = nccl_process_group_options(max_ctas=min(comm_sms, 64))
                groups[key] = dist.new_group([0], backend="nccl", pg_options=opts)
            self.group = groups[key]

    def launch(self):
        import torch.distributed as dist
        if self.kind == "nccl_a2a":
            dist.all_to_all_single(self.dst, self.src, group=self.group)
        elif self.kind == "sm_copy":
            from overlap._ext import sm_copy_
            sm_copy_(self.dst, self.src, num_sms=self.comm_sms or None, use_extension=True)
        else:
            self.dst.copy_(self.src, non_blocking=True)


class _Comp:
    def __init__(self, kind: str, m: int, num_sms: int, device):
        import torch
        self.kind, self.num_sms = kind, num_sms
        self.a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
        self.c = torch.empty(m, m, device=device, dtype=torch.bfloat16)

    def launch(self):
        import torch
        if self.kind == "cublas":
            torch.matmul(self.a, self.b, out=self.c)
        else:
            from overlap.kernels import persistent_matmul
            persistent_matmul(self.a, self.b, num_sms=self.num_sms, out=self.c)


def _measure(comp: _Comp, comm: _Comm, pair, iters: int, warmup: int) -> dict:
    import torch

    def ev():
        return torch.cuda.Event(enable_timing=True)

    def comp_alone():
        s, e = ev(), ev()
        s.record()
        comp.launch()
        e.record()
        return s, e

    def comm_alone():
        s, e = ev(), ev()
        s.record()
        with pair.on("comm", wait_for="current", join=True):
            comm.launch()
        e.record()
        return s, e

    def both():
        s, e = ev(), ev()
        s.record()                      # on the compute (current) stream
        with pair.on("comm", wait_for="current", join=False):
            comm.launch()               # comm first: it gets its SMs before the GEMM fills them
            done = pair.record("comm")
        comp.launch()
        pair.wait(done, None)           # join: the current stream waits for the comm kernel
        e.record()
        return s, e

    t_comp = _median_ms(comp_alone, None, iters, warmup)
    t_comm = _median_ms(comm_alone, None, iters, warmup)
    t_both = _median_ms(both, None, iters, warmup)
    from overlap.timeline import hidden_fraction, overlap_efficiency
    return {"t_comp_ms": t_comp, "t_comm_ms": t_comm, "t_both_ms": t_both,
            "overlap_efficiency": overlap_efficiency(t_comp / 1e3, t_comm / 1e3, t_both / 1e3),
            "hidden_fraction": hidden_fraction(t_comp / 1e3, t_comm / 1e3, t_both / 1e3),
            "exposed_comm_ms": t_both - t_comp}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overlap_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=8192, help="GEMM size M = N = K (bf16)")
    p.add_argument("--comm-mib", type=int, default=512, help="bytes moved per comm kernel, MiB")
    p.add_argument("--comm-sms", type=int, nargs="+", default=[0, 8, 16, 20, 24, 32])
    p.add_argument("--compute", nargs="+", default=["cublas", "persistent"],
                   choices=["cublas", "persistent"])
    p.add_argument("--comm", nargs="+", default=["nccl_a2a", "sm_copy", "ce_memcpy"],
                   choices=["nccl_a2a", "sm_copy", "ce_memcpy"])
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench.overlap_gpu needs CUDA (a GPU and a CUDA build of torch); this machine "
              f"has none (torch {torch.__version__}). Nothing measured, nothing written.")
        return 0
    import torch.distributed as dist

    from dualpipe.launch import free_port
    from overlap._ext import device_sm_count, extension_error, extension_kind
    from overlap.streams import StreamPair
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    total = device_sm_count(dev)
    skipped = {}
    computes = list(a.compute)
    if "persistent" in computes:
        try:
            import overlap.kernels as K
            if not K.HAS_TRITON:
                raise RuntimeError(K.TRITON_ERROR)
            x = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
            K.persistent_matmul(x, x, num_sms=8)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and go on without it
            skipped["persistent"] = f"overlap.kernels.persistent_matmul unusable: {e}"
            computes.remove("persistent")
    comms = list(a.comm)
    if "sm_copy" in comms and extension_kind() != "cuda":
        skipped["sm_copy"] = (f"the CUDA build of the extension is not loaded "
                              f"({extension_error() or 'CPU-only build'})")
        comms.remove("sm_copy")
    if "nccl_a2a" in comms:
        if not dist.is_nccl_available():
            skipped["nccl_a2a"] = "this torch has no NCCL"
            comms.remove("nccl_a2a")
        else:
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, device_id=dev)
    machine = common.machine_info("nccl" if "nccl_a2a" in comms else "cuda",
                                  sm_count=total,
                                  cuda_device_max_connections=__import__("os").environ.get(
                                      "CUDA_DEVICE_MAX_CONNECTIONS"))
    pair = StreamPair.create(dev)
    groups: dict = {}
    rows = []
    t0 = time.perf_counter()
    for ck in computes:
        for mk in comms:
            for k in a.comm_sms:
                if k >= total:
                    continue
                comp_sms = total if (k == 0 or mk == "ce_memcpy") else total - k
                comm_sms = 0 if mk == "ce_memcpy" else k
                comp = _Comp(ck, a.m, comp_sms, dev)
                comm = _Comm(mk, comm_sms, a.comm_mib << 20, dev, groups)
                r = _measure(comp, comm, pair, a.iters, a.warmup)
                r.update(compute=ck, comm=mk, comm_sms=k, compute_sms=comp_sms,
                         comm_gbps=(a.comm_mib << 20) / (r["t_comm_ms"] / 1e3) / 1e9)
                rows.append(r)
                print(f"  {ck:10s} {mk:9s} comm_sms={k:2d}: T_comp {r['t_comp_ms']:.3f} ms  "
                      f"T_comm {r['t_comm_ms']:.3f}  T_both {r['t_both_ms']:.3f}  "
                      f"eff {r['overlap_efficiency']:.3f}", flush=True)
                del comp, comm
    best = {}
    for r in rows:
        key = f"{r['compute']}|{r['comm']}"
        if key not in best or r["t_both_ms"] < best[key]["t_both_ms"]:
            best[key] = {"comm_sms": r["comm_sms"], "t_both_ms": r["t_both_ms"],
                         "overlap_efficiency": r["overlap_efficiency"]}
    out = common.out_dir(a.out)
    cfg = vars(a)
    common.write_json(out / "overlap_gpu.json", {
        "benchmark": "overlap_gpu", "machine": machine, "config": cfg, "skipped": skipped,
        "units": "milliseconds", "rows": rows, "best_split": best,
        "wall_s": time.perf_counter() - t0})
    headers = ["compute", "comm", "comm SMs", "compute SMs", "T_comp ms", "T_comm ms",
               "T_both ms", "overlap eff. (÷min)", "hidden frac. (÷T_comm)", "comm GB/s"]
    table = [[r["compute"], r["comm"], r["comm_sms"], r["compute_sms"],
              f"{r['t_comp_ms']:.3f}", f"{r['t_comm_ms']:.3f}", f"{r['t_both_ms']:.3f}",
              f"{r['overlap_efficiency']:.3f}", f"{r['hidden_fraction']:.3f}",
              f"{r['comm_gbps']:.0f}"] for r in rows]
    md = ["# Per-GPU overlap efficiency (`python -m bench.overlap_gpu`)", "",
          f"Machine: {common.describe_machine(machine)}; {total} SMs.", "",
          f"GEMM {a.m}^3 bf16; comm {a.comm_mib} MiB; median of {a.iters} after {a.warmup} "
          "warm-up, CUDA events.", ""]
    md += [f"Skipped: {k}: {v}." for k, v in skipped.items()]
    md += ["", common.md_table(headers, table), "", "Best split (smallest T_both):", "",
           common.md_table(["compute|comm", "comm SMs", "T_both ms", "overlap eff."],
                           [[k, v["comm_sms"], f"{v['t_both_ms']:.3f}",
                             f"{v['overlap_efficiency']:.3f}"] for k, v in best.items()]), ""]
    fig, (ax,) = common.new_figure(1, 7, 4)
    for key in best:
        ck, mk = key.split("|")
        pts = [(r["comm_sms"], r["overlap_efficiency"]) for r in rows
               if r["compute"] == ck and r["comm"] == mk]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", label=key)
    ax.set_xlabel("comm SMs (0 = no split)")
    ax.set_ylabel("(T_comp + T_comm - T_both) / min(T_comp, T_comm)")
    ax.set_title(f"overlap efficiency — {machine['gpu']}", fontsize=9)
    ax.legend(fontsize=7)
    common.save_figure(fig, out / "overlap_gpu.png")
    md += ["![overlap efficiency](overlap_gpu.png)", ""]
    (out / "overlap_gpu.md").write_text("\n".join(md))
    print(common.text_table(headers[:8], [t[:8] for t in table]))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
