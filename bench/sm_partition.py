"""SM-partition facts on one GPU: which SMs each side of an ``SMPartition`` reaches, and
what the compute side's SM budget costs a GEMM.

CUDA only.  On a machine without CUDA it prints that it needs CUDA, writes nothing and
exits 0.

For every backend in ``--backends`` (``priority``, ``torch_green_ctx``, ``green_ctx``)
and every comm SM count in ``--comm-sms`` it creates
``overlap.partition.SMPartition(k, backend=...)`` and records:

* the partition as granted (``describe()``: comm/compute SMs, rounding, which side the
  hardware confines), or why it could not be created;
* the SM-id probe (``SMPartition.probe()``: ``4 x total`` spinning blocks launched on
  each stream at once, each recording ``%smid``): the SM ids each side reached, as
  ranges, their counts against the granted ones, and the SMs both sides reached
  (``disjoint`` is true when there are none);
* the GEMM on the compute side: ``overlap.kernels.persistent_matmul(num_sms=compute
  SMs)`` and cuBLAS ``torch.matmul`` on the partition's compute stream, against the same
  kernels on every SM of a plain stream (bf16 ``M x M x M``, CUDA events, median of
  ``--iters``): milliseconds, TFLOP/s and the ratio to all SMs.

Also: the device's SM count and green-context granularity, the SMs a plain stream's
probe reaches, and which backend ``backend="auto"`` picks. Every fact that fails is
recorded with its error and the rest still run (exit 1 if any failed); the JSON is
rewritten after every row (``"finished": false`` until the end), so even a crash leaves
what was measured before it.

    python -m bench.sm_partition --comm-sms 8 16 24 32 --out /tmp/smp

Writes ``sm_partition.json`` and ``sm_partition.md`` under ``--out`` (default
``out/sm_partition``).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional

from bench.machine import describe_machine, machine_info
from bench.report import md_table, out_dir, write_json

#: In the order they run: plain streams first, our green contexts (the newest code) last,
#: so a crash there still leaves the other rows in the JSON (written after each row).
BACKENDS = ("priority", "torch_green_ctx", "green_ctx")
DEFAULT_OUT = os.path.join("out", "sm_partition")


def compact(ids: Iterable[int]) -> str:
    """``{0, 1, 2, 5, 7, 8}`` -> ``"0-2,5,7-8"`` (sorted; empty -> ``""``)."""
    xs = sorted(set(int(i) for i in ids))
    out: List[str] = []
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def probe_facts(seen: Dict[str, set], comm_sms: int, compute_sms: int) -> dict:
    """What a probe result says about a partition granted ``comm_sms`` / ``compute_sms``.

    ``comm_fits`` / ``compute_fits``: the side reached at most its granted count;
    ``comm_extra`` / ``compute_extra``: how many more it reached (0 when it fits);
    ``shared``: SM ids both sides reached; ``disjoint``: none did.
    """
    comm, compute = set(seen["comm"]), set(seen["compute"])
    shared = comm & compute
    return {
        "comm_ids": compact(comm), "compute_ids": compact(compute),
        "comm_reached": len(comm), "compute_reached": len(compute),
        "comm_fits": len(comm) <= comm_sms, "compute_fits": len(compute) <= compute_sms,
        "comm_extra": max(0, len(comm) - comm_sms),
        "compute_extra": max(0, len(compute) - compute_sms),
        "shared_ids": compact(shared), "shared": len(shared), "disjoint": not shared,
        "invalid_ids": sorted(i for i in comm | compute if i < 0),
    }


def _median_ms(fn: Callable[[], None], stream, iters: int, warmup: int) -> float:
    """Median milliseconds of ``fn()`` issued on ``stream`` (CUDA events on it)."""
    import torch
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            fn()
            end.record(stream)
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


class _Gemm:
    """bf16 ``M x M`` operands and the two GEMMs timed on a stream."""

    def __init__(self, m: int, device, stream) -> None:
        import torch
        self.m = m
        with torch.cuda.stream(stream):
            self.a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
            self.b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
            self.c = torch.empty(m, m, device=device, dtype=torch.bfloat16)
        stream.synchronize()

    def kernels(self, num_sms: int) -> Dict[str, Callable[[], None]]:
        import torch

        from overlap.kernels import persistent_matmul
        return {"persistent": lambda: persistent_matmul(self.a, self.b, num_sms=num_sms,
                                                        out=self.c),
                "cublas": lambda: torch.matmul(self.a, self.b, out=self.c)}

    def tflops(self, ms: float) -> float:
        return 2 * self.m ** 3 / (ms / 1e3) / 1e12


def _try(errors: list, where: str, fn: Callable[[], object]) -> Optional[object]:
    """``fn()``, or ``None`` with ``{"where", "error"}`` appended to ``errors``."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a fact that failed is a fact; the rest run
        errors.append({"where": where, "error": f"{type(exc).__name__}: {exc}"})
        print(f"  FAILED {where}: {type(exc).__name__}: {exc}", flush=True)
        return None


def _device_facts(dev, errors: list) -> dict:
    import torch

    from overlap import _ext
    props = torch.cuda.get_device_properties(dev)
    facts = {"name": props.name, "capability": f"{props.major}.{props.minor}",
             "sm_count": props.multi_processor_count, "extension": _ext.extension_kind()}
    if _ext.extension_kind() == "cuda":
        q = _try(errors, "green_ctx_query",
                 lambda: torch.ops.dualpipe_ext.green_ctx_query(dev.index))
        if q is not None:
            facts["driver_granularity"] = {"total": int(q[0]), "min_partition": int(q[1]),
                                           "alignment": int(q[2])}

        def plain_probe():
            ids = _ext.smid_probe(4 * props.multi_processor_count, device=dev)
            torch.cuda.synchronize(dev)
            seen = set(ids.cpu().tolist())
            return {"reached": len(seen), "ids": compact(seen)}
        facts["plain_stream_probe"] = _try(errors, "plain stream probe", plain_probe)
    return facts


def _time_all_sms(gemm: _Gemm, total: int, dev, iters: int, warmup: int, errors: list) -> dict:
    import torch
    stream = torch.cuda.Stream(device=dev)
    out = {}
    for name, fn in gemm.kernels(total).items():
        ms = _try(errors, f"{name} on all SMs", lambda: _median_ms(fn, stream, iters, warmup))
        if ms is not None:
            out[name] = {"ms": ms, "tflops": gemm.tflops(ms), "num_sms": total}
    return out


def _one(backend: str, k: int, dev, gemm: _Gemm, baseline: dict, a, errors: list) -> dict:
    from overlap.partition import PartitionError, SMPartition
    row: dict = {"backend": backend, "requested_comm_sms": k}
    try:
        part = SMPartition(k, dev, backend=backend)
    except PartitionError as exc:
        row["unavailable"] = f"{type(exc).__name__}: {exc}"
        return row
    with part:
        row["partition"] = part.describe()
        where = f"{backend} comm_sms={k}"
        seen = _try(errors, f"{where}: probe", part.probe)
        if seen is not None:
            row["probe"] = probe_facts(seen, part.comm_sms, part.compute_sms)
        gemms = {}
        for name, fn in gemm.kernels(part.compute_sms).items():
            ms = _try(errors, f"{where}: {name} on the compute side",
                      lambda: _median_ms(fn, part.compute_stream, a.iters, a.warmup))
            if ms is None:
                continue
            base = baseline.get(name)
            gemms[name] = {"ms": ms, "tflops": gemm.tflops(ms),
                           "num_sms": part.compute_sms if name == "persistent" else None,
                           "vs_all_sms": None if base is None else ms / base["ms"]}
        row["gemm_on_compute_side"] = gemms
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.sm_partition", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--comm-sms", type=int, nargs="+", default=[8, 16, 24, 32])
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--m", type=int, default=8192, help="GEMM size M = N = K (bf16)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new partition after this many seconds; write what was measured")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help=f"directory for the result files (default {DEFAULT_OUT})")
    a = p.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench.sm_partition needs CUDA (a GPU and a CUDA build of torch); this machine "
              f"has none (torch {torch.__version__}). Nothing measured, nothing written.")
        return 0
    from overlap.partition import PartitionError, SMPartition
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    t0 = time.perf_counter()
    errors: list = []
    device = _device_facts(dev, errors)
    total = device["sm_count"]
    machine = machine_info("cuda", sm_count=total,
                                  triton_pinned=os.environ.get("DUALPIPE_TRITON_PIN"))
    out = out_dir(a.out)
    result = {"benchmark": "sm_partition", "machine": machine, "config": vars(a),
              "device": device, "auto": None, "all_sms": {}, "rows": [], "truncated": False,
              "finished": False, "errors": errors, "units": "milliseconds", "wall_s": 0.0}

    def save() -> None:
        """Write the JSON as it stands: a crash in a later (riskier) partition keeps
        what was measured before it."""
        result["wall_s"] = time.perf_counter() - t0
        write_json(out / "sm_partition.json", result)

    save()
    gemm = _Gemm(a.m, dev, torch.cuda.current_stream(dev))
    result["all_sms"] = baseline = _time_all_sms(gemm, total, dev, a.iters, a.warmup, errors)
    save()
    rows = result["rows"]
    for backend in a.backends:  # default order: the safest backend first
        for k in a.comm_sms:
            if a.max_seconds is not None and time.perf_counter() - t0 > a.max_seconds:
                result["truncated"] = True
                break
            row = _try(errors, f"{backend} comm_sms={k}",
                       lambda: _one(backend, k, dev, gemm, baseline, a, errors))
            if row is not None:
                rows.append(row)
                _print_row(row)
                save()
        if result["truncated"]:
            break

    def auto_pick():
        try:
            with SMPartition(16, dev) as part:
                return part.describe()
        except PartitionError as exc:
            return {"unavailable": f"{type(exc).__name__}: {exc}"}
    result["auto"] = _try(errors, "backend='auto'", auto_pick)
    result["finished"] = True
    save()
    (out / "sm_partition.md").write_text(render_md(machine, device, result["auto"], baseline,
                                                   rows, result["truncated"], errors, a))
    return 1 if errors else 0


def _print_row(row: dict) -> None:
    head = f"  {row['backend']:15s} comm_sms={row['requested_comm_sms']:2d}:"
    if "unavailable" in row:
        print(f"{head} unavailable: {row['unavailable']}", flush=True)
        return
    d, pr = row["partition"], row.get("probe")
    seen = ("probe failed" if pr is None else
            f"probe comm {pr['comm_reached']} SMs [{pr['comm_ids']}], compute "
            f"{pr['compute_reached']}, shared {pr['shared']}")
    gem = ", ".join(f"{n} {g['ms']:.3f} ms" for n, g in row.get("gemm_on_compute_side", {}).items())
    print(f"{head} granted {d['comm_sms']}/{d['compute_sms']} ({d['enforced']}); {seen}; {gem}",
          flush=True)


def render_md(machine: dict, device: dict, auto, baseline: dict, rows: list, truncated: bool,
              errors: list, a) -> str:
    """The markdown report (pure: tested on CPU with made-up rows)."""
    md = ["# SM-partition facts (`python -m bench.sm_partition`)", "",
          f"Machine: {describe_machine(machine)}; {device.get('sm_count')} SMs, "
          f"compute capability {device.get('capability')}, extension "
          f"{device.get('extension')}.", ""]
    g = device.get("driver_granularity")
    if g:
        md.append(f"Driver granularity: min partition {g['min_partition']}, alignment "
                  f"{g['alignment']} (total {g['total']}).")
    plain = device.get("plain_stream_probe")
    if plain:
        md.append(f"A plain stream's probe reached {plain['reached']} SMs [{plain['ids']}].")
    if auto:
        md.append(f"`backend='auto'` picks: {auto.get('backend', auto.get('unavailable'))}.")
    md += ["", f"GEMM bf16 {a.m}^3, CUDA events, median of {a.iters}. On all SMs (plain "
           "stream): " + ", ".join(f"{n} {v['ms']:.3f} ms ({v['tflops']:.0f} TFLOP/s)"
                                   for n, v in baseline.items()), ""]
    headers = ["backend", "asked", "granted comm/compute", "enforced", "probe comm SMs",
               "probe compute SMs", "shared", "persistent ms (÷all)", "cuBLAS ms (÷all)"]
    table = []
    for r in rows:
        if "unavailable" in r:
            table.append([r["backend"], r["requested_comm_sms"], "unavailable", "-", "-", "-",
                          "-", "-", r["unavailable"][:80]])
            continue
        d, pr = r["partition"], r.get("probe")
        gm = r.get("gemm_on_compute_side", {})

        def cell(name):
            v = gm.get(name)
            if v is None:
                return "failed"
            ratio = "" if v["vs_all_sms"] is None else f" ({v['vs_all_sms']:.2f})"
            return f"{v['ms']:.3f}{ratio}"
        table.append([r["backend"], r["requested_comm_sms"],
                      f"{d['comm_sms']}/{d['compute_sms']}", d["enforced"],
                      "failed" if pr is None else f"{pr['comm_reached']} [{pr['comm_ids']}]",
                      "failed" if pr is None else f"{pr['compute_reached']}",
                      "failed" if pr is None else f"{pr['shared']}",
                      cell("persistent"), cell("cublas")])
    md += [md_table(headers, table), ""]
    if truncated:
        md += [f"**Truncated** after {a.max_seconds} s (--max-seconds).", ""]
    md += [f"**Failed**: {e['where']}: {e['error']}" for e in errors]
    return "\n".join(md) + "\n"


if __name__ == "__main__":
    sys.exit(main())
