"""Per-GPU overlap efficiency: a compute kernel and a communication kernel side by side.

CUDA only.  On a machine without CUDA it prints that it needs CUDA, writes nothing and
exits 0.

One process, one GPU.  Compute kernels (on the compute stream):

* ``cublas``      ``torch.matmul`` of two ``M x M`` bf16 matrices (cuBLAS; uses all SMs
                  whatever a software split says -- it shows the interference -- and
                  only the SMs of its green context on a ``green_ctx`` partition);
* ``persistent``  ``overlap.kernels.persistent_matmul(a, b, num_sms=compute SMs)`` (a
                  persistent Triton GEMM whose grid is its SM budget), when triton works.

Communication kernels (on the high-priority comm stream):

* ``nccl_a2a``    ``all_to_all_single`` of ``--comm-mib`` MiB on a 1-rank NCCL group whose
                  communicator is capped at ``comm SMs`` CTAs
                  (``overlap.partition.nccl_process_group_options(max_ctas=...)``).
                  ProcessGroupNCCL launches it on its own internal stream, so a green
                  context does not confine it: only the CTA cap does (``comm_confined``
                  is ``False`` on every row);
* ``sm_copy``     the extension's SM-budgeted copy ``overlap._ext.sm_copy_(dst, src,
                  num_sms=comm SMs)``, when the CUDA build is loaded;
* ``ce_memcpy``   a device -> pinned-host copy, done by a copy engine (0 SMs).

How the SMs are split (``--partitions``):

* ``software``        two plain streams (comm at the highest priority); the split is only
                      the kernels' sizes (DeepSeek-V3's 112/20).  Comm SMs 0 = no split:
                      compute on every SM, comm kernels at their default size;
* ``green_ctx``       ``overlap.partition.SMPartition(k, backend="green_ctx")``: both
                      streams on hardware-disjoint green contexts, counts read back;
* ``torch_green_ctx`` ``SMPartition(k, backend="torch_green_ctx")``: the comm stream on
                      a torch green context, compute on a plain stream (software budget).

A partition that cannot be created here is reported under ``skipped`` with the reason.
Settings that would measure the same thing twice (a repeated ``--comm-sms`` value, one
that the green context rounds to an already measured count, the copy-engine copy whose
compute side does not depend on the comm budget) are measured once.

For every remaining setting it measures, with CUDA events, median of ``--iters``:

* ``T_comp`` compute alone, ``T_comm`` communication alone, ``T_both`` both launched
  together (comm first, as TransformerEngine does, so the compute kernel cannot starve it);
* ``overlap_efficiency`` = (T_comp + T_comm - T_both) / min(T_comp, T_comm) (1.0: the
  shorter one was completely hidden) and ``hidden_fraction`` = (T_comp + T_comm - T_both)
  / T_comm, from ``overlap.timeline``;
* the best split: the setting with the smallest ``T_both`` per (partition, compute, comm).

    python -m bench.overlap_gpu                       # H100/H200-sized defaults
    python -m bench.overlap_gpu --m 4096 --comm-mib 128 --comm-sms 8 24 --iters 20 \\
        --partitions software green_ctx --out /tmp/overlap

Writes ``overlap_gpu.json``, ``overlap_gpu.md``, ``overlap_gpu.png`` under ``--out``
(default ``out/overlap_gpu`` below the current directory; never the source tree unless
asked). ``--max-seconds`` stops starting new settings after that long and writes what was
measured (``"truncated": true``). The JSON is also written before each new split
(``"finished": false``), so a crash keeps what was measured before it.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import statistics
import sys
import time
from typing import Iterable, List, Optional, Sequence

from bench.machine import describe_machine, machine_info
from bench.report import md_table, new_figure, out_dir, save_figure, text_table, write_json

#: In the order they run: plain streams first, our green contexts (the newest code) last,
#: so a crash there leaves the earlier rows in the JSON (written after every split).
PARTITIONS = ("software", "torch_green_ctx", "green_ctx")
COMPUTES = ("cublas", "persistent")
COMMS = ("nccl_a2a", "sm_copy", "ce_memcpy")
DEFAULT_OUT = os.path.join("out", "overlap_gpu")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One measurement: which kernels, on which split, sized how.

    ``comm_sms``: SMs the comm kernel is sized for (grid / NCCL CTA cap; 0 = its default
    size, or the copy engine); ``compute_sms``: the persistent GEMM's grid, and for
    cuBLAS the SMs it can reach (all of them unless ``compute_confined``).
    """

    partition: str
    compute: str
    comm: str
    requested_comm_sms: int
    comm_sms: int
    compute_sms: int
    compute_confined: bool
    comm_confined: Optional[bool]  # None: the copy engine uses no SM

    def key(self) -> tuple:
        """What determines the measurement (the requested count does not)."""
        return (self.partition, self.compute, self.comm, self.comm_sms, self.compute_sms,
                self.compute_confined)


def settings_for(partition: str, requested: int, total: int, computes: Sequence[str],
                 comms: Sequence[str], *, comm_sms: Optional[int] = None,
                 compute_sms: Optional[int] = None, enforced: str = "none") -> List[Setting]:
    """The settings of one split: ``requested`` comm SMs on ``partition``.

    For the software split the counts follow from ``requested`` (0 = no split); for a
    green-context partition pass the granted ``comm_sms`` / ``compute_sms`` and its
    ``enforced`` (``"both"``: compute confined too, ``"comm"``: comm side only).
    """
    if partition == "software":
        comm_sms, compute_sms = requested, total - requested
        enforced = "none"
    elif comm_sms is None or compute_sms is None:
        raise ValueError(f"partition {partition!r} needs the granted comm_sms and compute_sms")
    out = []
    for ck in computes:
        for mk in comms:
            k = 0 if mk == "ce_memcpy" else comm_sms
            confined = enforced == "both"
            if confined:
                c = compute_sms
            elif ck == "cublas" or mk == "ce_memcpy" or requested == 0:
                c = total  # cuBLAS ignores budgets; the copy engine needs no SM
            else:
                c = compute_sms
            if mk == "ce_memcpy":
                comm_confined = None
            elif mk == "nccl_a2a" or partition == "software":
                comm_confined = False  # NCCL's own stream; software: sizes only
            else:
                comm_confined = enforced in ("both", "comm")
            out.append(Setting(partition, ck, mk, requested, k, c, confined, comm_confined))
    return out


def _median_ms(fn, iters: int, warmup: int) -> float:
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
            key = min(comm_sms, 64)
            if key not in groups:
                opts = None
                if comm_sms > 0:
                    from overlap.partition import nccl_process_group_options
                    opts = nccl_process_group_options(max_ctas=key)
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
    """T_comp, T_comm, T_both on ``pair``'s streams; events on the current stream."""
    import torch

    def ev():
        return torch.cuda.Event(enable_timing=True)

    def alone(which, work):
        def run():
            s, e = ev(), ev()
            s.record()
            with pair.on(which, wait_for="current", join=True):
                work.launch()
            e.record()
            return s, e
        return run

    def both():
        s, e = ev(), ev()
        s.record()
        go = pair.record(None)
        with pair.on("comm", wait_for=go):
            comm.launch()               # comm first: it gets its SMs before the GEMM fills them
            comm_done = pair.record("comm")
        with pair.on("compute", wait_for=go):
            comp.launch()
            comp_done = pair.record("compute")
        pair.wait(comm_done, None)      # the current stream waits for both
        pair.wait(comp_done, None)
        e.record()
        return s, e

    t_comp = _median_ms(alone("compute", comp), iters, warmup)
    t_comm = _median_ms(alone("comm", comm), iters, warmup)
    t_both = _median_ms(both, iters, warmup)
    from overlap.timeline import hidden_fraction, overlap_efficiency
    return {"t_comp_ms": t_comp, "t_comm_ms": t_comm, "t_both_ms": t_both,
            "overlap_efficiency": overlap_efficiency(t_comp / 1e3, t_comm / 1e3, t_both / 1e3),
            "hidden_fraction": hidden_fraction(t_comp / 1e3, t_comm / 1e3, t_both / 1e3),
            "exposed_comm_ms": t_both - t_comp}


def _unique(values: Iterable[int]) -> List[int]:
    out: List[int] = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def _splits(a, dev, total: int, skipped: dict):
    """Yield ``(partition_description, StreamPair, settings)`` per split; partitions are
    closed when the caller moves on."""
    from overlap.partition import PartitionError, SMPartition
    from overlap.streams import StreamPair
    software = StreamPair.create(dev)
    for partition in _unique(a.partitions):
        for k in _unique(a.comm_sms):
            if k >= total or k < 0:
                skipped[f"{partition} comm_sms={k}"] = f"outside 0..{total - 1}"
                continue
            if partition == "software":
                yield ({"backend": "software", "comm_sms": k, "compute_sms": total - k},
                       software, settings_for(partition, k, total, a.compute, a.comm))
                continue
            if k == 0:
                continue  # no split: the software row
            try:
                part = SMPartition(k, dev, backend=partition)
            except PartitionError as exc:
                skipped[f"{partition} comm_sms={k}"] = f"{type(exc).__name__}: {exc}"
                continue
            try:
                yield (part.describe(), part.stream_pair(),
                       settings_for(partition, k, total, a.compute, a.comm,
                                    comm_sms=part.comm_sms, compute_sms=part.compute_sms,
                                    enforced=part.enforced))
            finally:
                part.close()


def _run_all(a, dev, total: int, skipped: dict, t0: float, checkpoint=None):
    """Measure every distinct setting of every split; returns ``(rows, partitions,
    truncated, errors)``: a setting that raises is recorded in ``errors`` and the others
    still run. Each partition is closed before the next is made (also on a break).
    ``checkpoint(rows, partitions, errors)`` is called before each new split."""
    groups: dict = {}
    rows, partitions, seen, errors = [], [], set(), []
    with contextlib.closing(_splits(a, dev, total, skipped)) as splits:
        for desc, pair, settings in splits:
            if checkpoint is not None:
                checkpoint(rows, partitions, errors)
            partitions.append(desc)
            for st in settings:
                if st.key() in seen:
                    continue
                if a.max_seconds is not None and time.perf_counter() - t0 > a.max_seconds:
                    return rows, partitions, True, errors
                seen.add(st.key())
                try:
                    comp = _Comp(st.compute, a.m, st.compute_sms, dev)
                    comm = _Comm(st.comm, st.comm_sms, a.comm_mib << 20, dev, groups)
                    r = _measure(comp, comm, pair, a.iters, a.warmup)
                except Exception as exc:  # noqa: BLE001 - recorded, reported, exit 1
                    errors.append({"setting": dataclasses.asdict(st),
                                   "error": f"{type(exc).__name__}: {exc}"})
                    print(f"  FAILED {st}: {type(exc).__name__}: {exc}", flush=True)
                    continue
                r.update(dataclasses.asdict(st), partition_backend=desc["backend"],
                         comm_gbps=(a.comm_mib << 20) / (r["t_comm_ms"] / 1e3) / 1e9)
                rows.append(r)
                print(f"  {st.partition:15s} {st.compute:10s} {st.comm:9s} "
                      f"comm_sms={st.comm_sms:2d} compute_sms={st.compute_sms:3d}: "
                      f"T_comp {r['t_comp_ms']:.3f} ms  T_comm {r['t_comm_ms']:.3f}  "
                      f"T_both {r['t_both_ms']:.3f}  eff {r['overlap_efficiency']:.3f}",
                      flush=True)
                del comp, comm
    return rows, partitions, False, errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overlap_gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--m", type=int, default=8192, help="GEMM size M = N = K (bf16)")
    p.add_argument("--comm-mib", type=int, default=512, help="bytes moved per comm kernel, MiB")
    p.add_argument("--comm-sms", type=int, nargs="+", default=[0, 8, 16, 20, 24, 32])
    p.add_argument("--compute", nargs="+", default=list(COMPUTES), choices=COMPUTES)
    p.add_argument("--comm", nargs="+", default=list(COMMS), choices=COMMS)
    p.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=PARTITIONS,
                   help="how the SMs are split (see the description)")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new setting after this many seconds; write what was measured")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for the result files (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench.overlap_gpu needs CUDA (a GPU and a CUDA build of torch); this machine "
              f"has none (torch {torch.__version__}). Nothing measured, nothing written.")
        return 0
    import torch.distributed as dist

    from dualpipe.launch import free_port
    from overlap._ext import device_sm_count, extension_error, extension_kind
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    total = device_sm_count(dev)
    skipped = {}
    a.compute = list(a.compute)
    if "persistent" in a.compute:
        try:
            import overlap.kernels as K
            if not K.HAS_TRITON:
                raise RuntimeError(K.TRITON_ERROR)
            x = torch.randn(256, 256, device=dev, dtype=torch.bfloat16)
            K.persistent_matmul(x, x, num_sms=8)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and go on without it
            skipped["persistent"] = f"overlap.kernels.persistent_matmul unusable: {e}"
            a.compute.remove("persistent")
    a.comm = list(a.comm)
    if "sm_copy" in a.comm and extension_kind() != "cuda":
        skipped["sm_copy"] = (f"the CUDA build of the extension is not loaded "
                              f"({extension_error() or 'CPU-only build'})")
        a.comm.remove("sm_copy")
    if "nccl_a2a" in a.comm:
        if not dist.is_nccl_available():
            skipped["nccl_a2a"] = "this torch has no NCCL"
            a.comm.remove("nccl_a2a")
        else:
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1, device_id=dev)
    machine = machine_info("nccl" if "nccl_a2a" in a.comm else "cuda",
                                  sm_count=total,
                                  cuda_device_max_connections=os.environ.get(
                                      "CUDA_DEVICE_MAX_CONNECTIONS"),
                                  triton_pinned=os.environ.get("DUALPIPE_TRITON_PIN"))
    t0 = time.perf_counter()
    out = out_dir(a.out)

    def checkpoint(rows, partitions, errors):
        """The JSON so far (``"finished": false``): a crash in a later split keeps it."""
        write_json(out / "overlap_gpu.json", {
            "benchmark": "overlap_gpu", "machine": machine, "config": vars(a),
            "skipped": skipped, "partitions": partitions, "finished": False,
            "errors": errors, "units": "milliseconds", "rows": rows,
            "wall_s": time.perf_counter() - t0})
    rows, partitions, truncated, errors = _run_all(a, dev, total, skipped, t0, checkpoint)
    write_report(a, machine, total, skipped, rows, partitions, truncated, errors,
                 time.perf_counter() - t0)
    if dist.is_initialized():
        dist.destroy_process_group()
    if errors:
        print(f"bench.overlap_gpu: {len(errors)} setting(s) failed (listed under 'errors' "
              f"in {a.out}/overlap_gpu.json); first: {errors[0]['error']}", file=sys.stderr)
        return 1
    return 0


def write_report(a, machine: dict, total: int, skipped: dict, rows: list, partitions: list,
                 truncated: bool, errors: list, wall_s: float):
    """Write overlap_gpu.json / .md / .png under ``a.out``, print the table; returns the
    directory."""
    best = {}
    for r in rows:
        key = f"{r['partition']}|{r['compute']}|{r['comm']}"
        if key not in best or r["t_both_ms"] < best[key]["t_both_ms"]:
            best[key] = {"comm_sms": r["comm_sms"], "compute_sms": r["compute_sms"],
                         "t_both_ms": r["t_both_ms"],
                         "overlap_efficiency": r["overlap_efficiency"]}
    out = out_dir(a.out)
    cfg = vars(a)
    write_json(out / "overlap_gpu.json", {
        "benchmark": "overlap_gpu", "machine": machine, "config": cfg, "skipped": skipped,
        "partitions": partitions, "truncated": truncated, "errors": errors, "finished": True,
        "units": "milliseconds", "rows": rows, "best_split": best, "wall_s": wall_s})
    headers = ["partition", "compute", "comm", "comm SMs", "compute SMs", "T_comp ms",
               "T_comm ms", "T_both ms", "overlap eff. (÷min)", "hidden frac. (÷T_comm)",
               "comm GB/s"]
    table = [[r["partition"], r["compute"], r["comm"], r["comm_sms"],
              f"{r['compute_sms']}{'' if r['compute_confined'] else '*'}",
              f"{r['t_comp_ms']:.3f}", f"{r['t_comm_ms']:.3f}", f"{r['t_both_ms']:.3f}",
              f"{r['overlap_efficiency']:.3f}", f"{r['hidden_fraction']:.3f}",
              f"{r['comm_gbps']:.0f}"] for r in rows]
    md = ["# Per-GPU overlap efficiency (`python -m bench.overlap_gpu`)", "",
          f"Machine: {describe_machine(machine)}; {total} SMs.", "",
          f"GEMM {a.m}^3 bf16; comm {a.comm_mib} MiB; median of {a.iters} after {a.warmup} "
          "warm-up, CUDA events. Compute SMs marked * are a software budget (or, for "
          "cuBLAS, all SMs); unmarked ones are confined by a green context. NCCL runs on "
          "its own stream: only its CTA cap limits it.", ""]
    if truncated:
        md += [f"**Truncated** after {a.max_seconds} s (--max-seconds): not every setting ran.", ""]
    md += [f"**Failed**: {e['setting']}: {e['error']}" for e in errors]
    md += [f"Skipped: {k}: {v}." for k, v in skipped.items()]
    md += ["", md_table(headers, table), "", "Best split (smallest T_both):", "",
           md_table(["partition|compute|comm", "comm SMs", "T_both ms", "overlap eff."],
                           [[k, v["comm_sms"], f"{v['t_both_ms']:.3f}",
                             f"{v['overlap_efficiency']:.3f}"] for k, v in best.items()]), ""]
    fig, (ax,) = new_figure(1, 7, 4)
    for key in best:
        part, ck, mk = key.split("|")
        pts = [(r["comm_sms"], r["overlap_efficiency"]) for r in rows
               if r["partition"] == part and r["compute"] == ck and r["comm"] == mk]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "-o", label=key)
    ax.set_xlabel("comm SMs (0 = no split / copy engine)")
    ax.set_ylabel("(T_comp + T_comm - T_both) / min(T_comp, T_comm)")
    ax.set_title(f"overlap efficiency — {machine['gpu']}", fontsize=9)
    if best:
        ax.legend(fontsize=6)
    save_figure(fig, out / "overlap_gpu.png")
    md += ["![overlap efficiency](overlap_gpu.png)", ""]
    (out / "overlap_gpu.md").write_text("\n".join(md))
    print(text_table(headers[:9], [t[:9] for t in table]))
    return out




if __name__ == "__main__":
    sys.exit(main())
