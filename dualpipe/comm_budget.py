"""The communication SM budget for ``python -m dualpipe plan --comm-sms FILE``.

An overlapped schedule hides a stage's communication (an MoE layer's dispatch and
combine all-to-alls) under another micro-batch's compute, and the split of the GPU's SMs
between the two decides both sides: SMs given to the communication kernels slow the
compute, SMs kept from them slow the transfer.  Which split is best depends on the
block, so it is measured, not guessed: ``bench.overlap_gpu`` runs a compute kernel and
a communication kernel side by side on the GPU for every communication SM budget it is
given, and its ``overlap_gpu.json`` is what this module reads.  For each measured
budget ``s`` (one *point*):

* ``compute_factor``: the compute kernel's time alone at that split over its fastest
  time in the same measurement (1.0 for the split that leaves compute the most SMs);
* ``comm_bandwidth``: bytes per second of the communication kernel alone with ``s`` SMs;
* ``overlap_efficiency``: how much of the shorter of the two the measured overlap hid,
  ``(T_comp + T_comm - T_both) / min(T_comp, T_comm)``, clipped to [0, 1].

A block that moves ``comm_bytes`` per forward + backward (half in each) is then priced
at budget ``s`` as a run with that split throughout (one budget per run, as DeepSeek-V3
fixes 20 of 132 SMs for communication):

* every compute part is ``compute_factor`` times slower: F, B, W and the F&B pair's
  compute;
* F and B alone also wait for their own half of the communication, unhidden:
  ``comm_bytes / 2 / comm_bandwidth`` each;
* an F&B pair runs its compute ``c`` next to its communication ``d = comm_bytes /
  comm_bandwidth`` (one micro-batch's forward half and another's backward half) and takes
  ``c + d - overlap_efficiency * min(c, d)``.

:func:`dualpipe.plan.plan` prices every candidate at every point and keeps the budget
that gives it the shortest step.  What this does not model: the kernels' interference
on the block's own kernels (the measurement's GEMM and all-to-all stand in for them), a
budget the measurement did not include, and the network beyond the GPU (the
measurement's all-to-all is on one GPU unless it was run across nodes).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["BudgetPoint", "CommBudget", "load_comm_budget", "DEFAULT_KERNELS"]

#: the (partition, compute, comm) rows used when ``--comm-kernels`` is not given, in
#: order of preference: a cuBLAS GEMM next to an NCCL all-to-all, split in software
DEFAULT_KERNELS = ("software/cublas/nccl_a2a", "green_ctx/cublas/nccl_a2a")


@dataclass(frozen=True)
class BudgetPoint:
    """One measured communication SM budget (see the module docstring)."""

    comm_sms: int
    compute_sms: int
    compute_factor: float
    comm_bandwidth: float
    overlap_efficiency: float

    def label(self) -> str:
        return f"{self.comm_sms} comm SMs" if self.comm_sms else "default (no split)"


@dataclass(frozen=True)
class CommBudget:
    """The measured points of one (partition, compute, comm) kernel triple and the
    block's communication volume ``comm_bytes`` per forward + backward, at
    ``micro_batch`` samples (scaled linearly with the micro-batch like every cost)."""

    points: tuple[BudgetPoint, ...]
    comm_bytes: float
    micro_batch: int
    kernels: str
    source: str

    def costs_at(self, block, p: BudgetPoint):
        """``block`` (a :class:`dualpipe.plan.BlockCosts` at any micro-batch size)
        priced with budget ``p``: its compute slowed by ``p.compute_factor``, F and B
        waiting for their halves of the communication, the F&B pair overlapping it."""
        comm = self.comm_bytes * block.micro_batch / self.micro_batch
        d = comm / p.comm_bandwidth
        k = p.compute_factor
        pair = (block.f + block.b if block.fb is None else block.fb) * k
        fb = pair + d - p.overlap_efficiency * min(pair, d)
        # w <= b holds: both are scaled by k and b only grows
        return replace(block, f=block.f * k + d / 2, b=block.b * k + d / 2, w=block.w * k,
                       fb=fb)

    def describe(self) -> str:
        lines = [f"communication SM budget: {len(self.points)} point(s) of {self.kernels} "
                 f"from {self.source}; {self.comm_bytes / 2**20:.3f} MiB moved per forward + "
                 f"backward of one block at {self.micro_batch} samples",
                 "  comm SMs  compute SMs  compute x  comm GB/s  overlap efficiency"]
        for p in self.points:
            lines.append(f"  {p.comm_sms:8d}  {p.compute_sms:11d}  {p.compute_factor:9.3f}  "
                         f"{p.comm_bandwidth / 1e9:9.2f}  {p.overlap_efficiency:18.3f}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"kernels": self.kernels, "source": self.source, "comm_bytes": self.comm_bytes,
                "micro_batch": self.micro_batch,
                "points": [p.__dict__ for p in self.points]}


def _number(row: dict, key: str, where: str) -> float:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    return float(v)


def load_comm_budget(path: str | os.PathLike, comm_bytes: float, micro_batch: int,
                     kernels: str | None = None) -> CommBudget:
    """Read ``bench.overlap_gpu``'s JSON (``path``) into a :class:`CommBudget` for a
    block moving ``comm_bytes`` per forward + backward at ``micro_batch`` samples.
    ``kernels``: ``"partition/compute/comm"`` rows to use (default: the first of
    :data:`DEFAULT_KERNELS` present, else the triple with the most rows).  Raises
    ``ValueError`` saying what to change for a file that is not such a measurement, a
    triple it does not hold, or a bad volume."""
    name = os.fspath(path)
    if isinstance(comm_bytes, bool) or not isinstance(comm_bytes, (int, float)) \
            or not math.isfinite(comm_bytes) or comm_bytes < 0:
        raise ValueError(f"--comm-bytes must be a finite number of bytes >= 0, got "
                         f"{comm_bytes!r}")
    try:
        with open(path) as fh:
            d: Any = json.load(fh)
    except json.JSONDecodeError as e:
        raise ValueError(f"--comm-sms {name!r} is not valid JSON: {e}") from None
    except OSError as e:
        raise ValueError(f"cannot read --comm-sms {name!r}: {e}") from None
    if not isinstance(d, dict) or d.get("benchmark") != "overlap_gpu":
        raise ValueError(f"--comm-sms {name!r} is not a bench.overlap_gpu measurement (no "
                         "\"benchmark\": \"overlap_gpu\"): run `python -m bench.overlap_gpu "
                         "--out DIR` on the GPU you plan for and pass DIR/overlap_gpu.json")
    rows = d.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"--comm-sms {name!r} has no measured rows (\"rows\" is empty or "
                         "missing): the benchmark measured nothing; see its \"skipped\" and "
                         "\"errors\"")
    groups: dict[str, list[dict]] = {}
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{name}: row {i} is not an object")
        key = "/".join(str(r.get(k)) for k in ("partition", "compute", "comm"))
        groups.setdefault(key, []).append(r)
    if kernels is None:
        kernels = next((k for k in DEFAULT_KERNELS if k in groups),
                       max(groups, key=lambda k: len(groups[k])))
    elif kernels not in groups:
        raise ValueError(f"--comm-kernels {kernels!r} is not in {name}; it holds: "
                         f"{', '.join(sorted(groups))}")
    chosen = groups[kernels]
    comm_size = None
    cfg = d.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("comm_mib"), (int, float)):
        comm_size = float(cfg["comm_mib"]) * 2**20
    raw = []
    for i, r in enumerate(chosen):
        where = f"{name}: {kernels} row {i}"
        t_comp, t_comm, t_both = (_number(r, k, where)
                                  for k in ("t_comp_ms", "t_comm_ms", "t_both_ms"))
        if min(t_comp, t_comm, t_both) <= 0:
            raise ValueError(f"{where}: times must be > 0 ms, got T_comp {t_comp}, T_comm "
                             f"{t_comm}, T_both {t_both}")
        if "comm_gbps" in r:
            bw = _number(r, "comm_gbps", where) * 1e9
        elif comm_size is not None:
            bw = comm_size / (t_comm / 1e3)
        else:
            raise ValueError(f"{where}: no \"comm_gbps\" and no \"config\".\"comm_mib\": "
                             "cannot tell the communication bandwidth")
        if not bw > 0:
            raise ValueError(f"{where}: the communication bandwidth must be > 0, got {bw}")
        eff = (t_comp + t_comm - t_both) / min(t_comp, t_comm)
        raw.append((int(_number(r, "comm_sms", where)), int(_number(r, "compute_sms", where)),
                    t_comp, bw, min(1.0, max(0.0, eff))))
    fastest = min(t for _, _, t, _, _ in raw)
    points = tuple(sorted((BudgetPoint(s, cs, t / fastest, bw, eff)
                           for s, cs, t, bw, eff in raw), key=lambda p: p.comm_sms))
    gpu = ""
    m = d.get("machine")
    if isinstance(m, dict):
        gpu = str(m.get("gpu") or "")
    return CommBudget(points, float(comm_bytes), int(micro_batch), kernels,
                      name + (f" ({gpu})" if gpu else ""))
