"""Price a schedule: makespan, per-rank busy/idle time and peak live activations.

Cost model (:class:`Costs`): a forward chunk costs ``f``; a full backward ``b``; its
weight-gradient part ``w`` (so an input-gradient-only backward ``I`` costs ``b - w``);
an overlapped forward+backward pair ``fb`` (default ``f + b``: no overlap); every
transfer between two ranks adds ``latency`` between the producer's end and the
consumer's earliest start (transfers between chunks of one rank are free).

Each rank runs its actions in order; an action starts when the rank is free and its
inputs have arrived.  Activations live on a rank are the (chunk, micro-batch) pairs
whose forward has run and whose input-gradient backward has not; in an ``FB`` pair the
forward is counted before the backward releases its micro-batch.

**Bubble.**  ``SimResult.bubble`` is the idle time (makespan minus busy time) of the
most idle rank: for DualPipe/DualPipeV the ranks at the middle of the pipe, for
1F1B/ZB1P every rank alike.  With the published model's assumption that a forward
costs as much as an input-gradient backward (``f == b - w``) it equals the published
formula exactly for any ``w`` and any ``fb`` in ``[max(f, b), f + b]``; outside that
regime it differs (see ``docs/schedules.md``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from overlap.trace import Interval

from .schedules import B, F, FB, I, W, Action, Schedule, gc_paused, placement_schedule, spec_of

__all__ = ["Costs", "Interval", "SimResult", "simulate", "formula_bubble", "formula_activations"]


@dataclass(frozen=True)
class Costs:
    """Per-action costs in any time unit (all >= 0, ``w <= b``)."""

    f: float = 1.0
    b: float = 2.0
    w: float = 1.0
    fb: float | None = None
    latency: float = 0.0

    def __post_init__(self):
        for name in ("f", "b", "w", "latency"):
            if getattr(self, name) < 0:
                raise ValueError(f"cost {name} must be >= 0, got {getattr(self, name)}")
        if self.w > self.b:
            raise ValueError(f"the weight part w={self.w} cannot exceed the full backward b={self.b}")
        if self.fb is not None and self.fb < 0:
            raise ValueError(f"cost fb must be >= 0, got {self.fb}")

    @property
    def pair(self) -> float:
        return self.f + self.b if self.fb is None else self.fb

    def of(self, a: Action) -> float:
        k = a.kind
        if k == F:
            return self.f
        if k == B:
            return self.b
        if k == I:
            return self.b - self.w
        if k == W:
            return self.w
        if k == FB:
            return self.pair
        return 0.0


@dataclass
class SimResult:
    schedule: Schedule
    costs: Costs
    makespan: float
    busy: list[float]
    idle: list[float]
    peak_activations: list[int]
    intervals: list[Interval] = field(repr=False)
    bubble: float = 0.0
    formula_bubble: float | None = None

    def to_json(self) -> dict:
        s = self.schedule
        return {
            "schedule": s.name, "ranks": s.num_ranks, "chunks": s.num_chunks,
            "costs": {"f": self.costs.f, "b": self.costs.b, "w": self.costs.w,
                      "fb": self.costs.pair, "latency": self.costs.latency},
            "makespan": self.makespan, "bubble": self.bubble,
            "formula_bubble": self.formula_bubble,
            "idle": self.idle, "busy": self.busy,
            "peak_activations": self.peak_activations,
            "formula_activations": formula_activations(s.name, s.num_ranks),
        }


@gc_paused()
def simulate(s: Schedule, costs: Costs = Costs()) -> SimResult:
    """Run ``s`` under ``costs``; raises ``ValueError`` if it cannot finish
    (run :func:`dualpipe.validate.validate` for the reason).

    ``intervals`` of the result come rank by rank (rank 0 first), each rank's in
    program order.  Linear in the number of actions: each rank runs until an action
    waits for an output not produced yet and resumes when that output is produced,
    so every action is tried at most twice."""
    P = s.num_ranks
    lat = costs.latency
    owner = s.stage_owner
    # end time of the forward / backward of each (stream, stage, micro-batch); None
    # until it has run
    fend = [[[None] * st.num_microbatches for _ in range(st.num_stages)] for st in s.streams]
    bend = [[[None] * st.num_microbatches for _ in range(st.num_stages)] for st in s.streams]
    # per rank and chunk, for F and for B/I: (the end times it waits for, the latency
    # added to them), or None (a first stage's F); and the end times it writes
    def link(r: int, ends, stream: int, stage: int):
        crosses = owner.get((stream, stage), (r,))[0] != r
        return ends[stream][stage], (lat if crosses else 0.0)

    wait_on, writes = [], []
    for r, chunks in enumerate(s.placement):
        w_r, o_r = [], []
        for stream, stage in chunks:
            last = stage + 1 == s.streams[stream].num_stages
            w_r.append((link(r, fend, stream, stage - 1) if stage > 0 else None,
                        (fend[stream][stage], 0.0) if last else link(r, bend, stream, stage + 1)))
            o_r.append((fend[stream][stage], bend[stream][stage]))
        wait_on.append(w_r)
        writes.append(o_r)
    waiters: dict[tuple[int, int], list[int]] = {}  # (id of an end list, mb) -> ranks
    clock = [0.0] * P
    busy = [0.0] * P
    pos = [0] * P
    per_rank: list[list[Interval]] = [[] for _ in range(P)]

    runnable = deque(range(P))
    while runnable:
        r = runnable.popleft()
        acts = s.actions[r]
        while pos[r] < len(acts):
            a = acts[pos[r]]
            t = clock[r]
            blocked = None
            for kind, c, m in a.parts():
                if kind == W:
                    continue  # ordered after its I by program order
                if not 0 <= m < len(writes[r][c][0]):
                    raise ValueError(f"{a} on rank {r}: micro-batch {m} is out of range; "
                                     "run dualpipe.validate.validate() for details")
                dep = wait_on[r][c][0 if kind == F else 1]
                if dep is None:
                    continue
                ends, extra = dep
                end = ends[m]
                if end is None:
                    blocked = (id(ends), m)
                    break
                t = max(t, end + extra)
            if blocked is not None:
                waiters.setdefault(blocked, []).append(r)
                break
            end = t + costs.of(a)
            for kind, c, m in a.parts():
                if kind != W:
                    ends = writes[r][c][0 if kind == F else 1]
                    ends[m] = end
                    if waiters:
                        runnable.extend(waiters.pop((id(ends), m), ()))
            per_rank[r].append(Interval(r, t, end, a))
            busy[r] += end - t
            clock[r] = end
            pos[r] += 1
    if any(pos[r] < len(s.actions[r]) for r in range(P)):
        raise ValueError(f"schedule {s.name!r} cannot complete (stuck at "
                         f"{[str(s.actions[r][pos[r]]) for r in range(P) if pos[r] < len(s.actions[r])]}); "
                         "run dualpipe.validate.validate() for details")
    intervals = [iv for ivs in per_rank for iv in ivs]
    makespan = max(clock) if P else 0.0
    idle = [makespan - b for b in busy]
    peaks = [_peak_activations(acts) for acts in s.actions]
    res = SimResult(s, costs, makespan, busy, idle, peaks, intervals)
    res.bubble = bubble_of(res)
    res.formula_bubble = formula_bubble(s.name, s.num_ranks, costs)
    return res


def _peak_activations(acts) -> int:
    live = peak = 0
    for a in acts:
        for kind, _c, _m in a.parts():
            if kind == F:
                live += 1
                peak = max(peak, live)
            elif kind in (B, I):
                live -= 1
    return peak


def bubble_of(res: SimResult) -> float:
    """The figure comparable to the published table (see ``docs/schedules.md``)."""
    return max(res.idle) if res.idle else 0.0


def pipeline_degree(name: str, num_ranks: int) -> int:
    """PP as the published table uses it: the number of pipeline stages."""
    return placement_schedule(name, num_ranks).num_stages


def formula_bubble(name: str, num_ranks: int, c: Costs) -> float | None:
    """The published bubble for ``name`` (``None`` where none is published)."""
    spec = spec_of(name)
    return None if spec.bubble is None else spec.bubble(pipeline_degree(name, num_ranks), c)


def formula_activations(name: str, num_ranks: int) -> int | None:
    """The published activations per device, in stage-chunk units."""
    spec = spec_of(name)
    return None if spec.activations is None else spec.activations(
        pipeline_degree(name, num_ranks))
