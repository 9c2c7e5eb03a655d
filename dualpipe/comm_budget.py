"""The communication SM budget for ``python -m dualpipe plan --comm-sms FILE``.

An overlapped schedule hides a stage's communication (an MoE layer's dispatch and
combine all-to-alls) under another micro-batch's compute, and the split of the GPU's SMs
between the two decides both sides: SMs given to the communication kernels slow the
compute, SMs kept from them slow the transfer.  Which split is best depends on the
block, so it is measured, not guessed: ``bench.overlap_gpu`` runs a compute kernel and
a communication kernel side by side on the GPU for every communication SM budget it is
given, and its ``overlap_gpu.json`` is what this module reads.  For each measured
budget ``s`` (one *point*):

* ``compute_factor``: the compute kernel's time alone at that split over its time
  alone on the most SMs any row of the chosen kernels gives it (the median of those
  rows); exactly 1.0 for a row with that many compute SMs -- a software split leaves
  cuBLAS every SM on every row, so there only the overlap efficiency carries the
  interference, while a persistent GEMM or a green-context partition really loses SMs --
  and never below 1.0 (a split cannot speed compute up: less is noise);
* ``comm_bandwidth``: bytes per second of the communication kernel alone with ``s`` SMs,
  capped at ``link_bandwidth`` when given: ``bench.overlap_gpu`` runs on one GPU (a
  1-rank NCCL group), so its rate is what the SMs can move, not what the links between
  GPUs carry (``--comm-bandwidth``: the per-GPU all-to-all bandwidth of your network);
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
budget the measurement did not include, and the network beyond the GPU unless
``--comm-bandwidth`` gives it (the measurement is on one GPU).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["BudgetPoint", "CommBudget", "load_comm_budget", "budget_label", "DEFAULT_KERNELS"]

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
        """``"16"``, or ``"default"`` for the row without a split (communication kernels
        at their own size, which still occupy SMs)."""
        return budget_label(self.comm_sms)


def budget_label(comm_sms: int) -> str:
    """How a budget is printed: the SM count, ``"default"`` for 0 (no split)."""
    return str(comm_sms) if comm_sms else "default"


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
    link_bandwidth: float | None = None
    warnings: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.points:
            raise ValueError("a communication SM budget needs at least one measured point")
        if isinstance(self.micro_batch, bool) or not isinstance(self.micro_batch, int) \
                or self.micro_batch < 1:
            raise ValueError(f"micro_batch must be an integer >= 1, got {self.micro_batch!r}")
        if isinstance(self.comm_bytes, bool) or not (
                isinstance(self.comm_bytes, (int, float)) and math.isfinite(self.comm_bytes)
                and self.comm_bytes >= 0):
            raise ValueError(f"--comm-bytes must be a finite number of bytes >= 0, got "
                             f"{self.comm_bytes!r}")
        if self.link_bandwidth is not None and not self.link_bandwidth > 0:
            raise ValueError(f"--comm-bandwidth must be > 0 bytes/s, got "
                             f"{self.link_bandwidth!r}")
        for p in self.points:
            if not (p.compute_factor >= 1.0 and p.comm_bandwidth > 0
                    and 0.0 <= p.overlap_efficiency <= 1.0):
                raise ValueError(f"bad budget point {p}: needs compute_factor >= 1, "
                                 "comm_bandwidth > 0, 0 <= overlap_efficiency <= 1")

    def bandwidth(self, p: BudgetPoint) -> float:
        """The communication's bytes per second at budget ``p``: what its SMs move,
        capped by the link (``link_bandwidth``)."""
        return p.comm_bandwidth if self.link_bandwidth is None \
            else min(p.comm_bandwidth, self.link_bandwidth)

    def costs_at(self, block, p: BudgetPoint):
        """``block`` (a :class:`dualpipe.plan.BlockCosts` at any micro-batch size)
        priced with budget ``p``: its compute slowed by ``p.compute_factor``, F and B
        waiting for their halves of the communication, the F&B pair overlapping it."""
        comm = self.comm_bytes * block.micro_batch / self.micro_batch
        d = comm / self.bandwidth(p)
        k = p.compute_factor
        pair = (block.f + block.b if block.fb is None else block.fb) * k
        fb = pair + d - p.overlap_efficiency * min(pair, d)
        # w <= b holds: both are scaled by k and b only grows
        return replace(block, f=block.f * k + d / 2, b=block.b * k + d / 2, w=block.w * k,
                       fb=fb)

    def describe(self) -> str:
        link = ("measured on one GPU, not capped by a link (--comm-bandwidth)"
                if self.link_bandwidth is None else
                f"capped at --comm-bandwidth {self.link_bandwidth / 1e9:g} GB/s")
        lines = [f"communication SM budget: {len(self.points)} point(s) of {self.kernels} "
                 f"from {self.source}; {self.comm_bytes / 2**20:.3f} MiB moved per forward + "
                 f"backward of one block at {self.micro_batch} samples; bandwidth {link}",
                 "  comm SMs  compute SMs  compute x  comm GB/s  overlap efficiency"]
        for p in self.points:
            lines.append(f"  {p.label():>8s}  {p.compute_sms:11d}  {p.compute_factor:9.3f}  "
                         f"{self.bandwidth(p) / 1e9:9.2f}  {p.overlap_efficiency:18.3f}")
        lines += [f"  warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"kernels": self.kernels, "source": self.source, "comm_bytes": self.comm_bytes,
                "micro_batch": self.micro_batch, "link_bandwidth": self.link_bandwidth,
                "warnings": list(self.warnings), "points": [asdict(p) for p in self.points]}


def _number(row: dict, key: str, where: str) -> float:
    v = row.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: field {key!r} must be a finite number, got {v!r}")
    return float(v)


def load_comm_budget(path: str | os.PathLike, comm_bytes: float, micro_batch: int,
                     kernels: str | None = None,
                     link_bandwidth: float | None = None) -> CommBudget:
    """Read ``bench.overlap_gpu``'s JSON (``path``) into a :class:`CommBudget` for a
    block moving ``comm_bytes`` per forward + backward at ``micro_batch`` samples.
    ``kernels``: ``"partition/compute/comm"`` rows to use (default: the first of
    :data:`DEFAULT_KERNELS` present, else the triple with the most rows);
    ``link_bandwidth``: cap the measured bandwidth (bytes/s).  Raises
    ``ValueError`` saying what to change for a file that is not such a measurement, a
    triple it does not hold, or (from :class:`CommBudget`) a bad volume."""
    name = os.fspath(path)
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
    most = max(cs for _, cs, _, _, _ in raw)
    ref = sorted(t for _, cs, t, _, _ in raw if cs == most)
    ref_t = ref[len(ref) // 2]
    points = tuple(sorted((BudgetPoint(s, cs, 1.0 if cs == most else max(1.0, t / ref_t), bw,
                                       eff)
                           for s, cs, t, bw, eff in raw), key=lambda p: p.comm_sms))
    warnings = []
    if d.get("finished") is False:
        warnings.append("the measurement did not finish (crashed or killed): rows so far")
    if d.get("truncated"):
        warnings.append("the measurement was cut short by its --max-seconds")
    if d.get("errors"):
        warnings.append(f"{len(d['errors'])} setting(s) of the measurement failed")
    gpu = ""
    m = d.get("machine")
    if isinstance(m, dict):
        gpu = str(m.get("gpu") or "")
    return CommBudget(points, float(comm_bytes), int(micro_batch), kernels,
                      name + (f" ({gpu})" if gpu else ""), link_bandwidth, tuple(warnings))
