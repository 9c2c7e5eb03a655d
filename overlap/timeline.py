"""Record what ran where and when, and measure how much communication compute hid.

:class:`Timeline` records spans per *lane* of one rank (``"compute"``, ``"comm"``, or the
sub-stage lanes of :mod:`overlap.fb`), with the host clock (``time.perf_counter``) on the
CPU and CUDA events on a GPU (resolved lazily, when :meth:`Timeline.intervals` is
called, so recording never synchronises).  Times come out in **seconds** from the
timeline's origin, as :class:`overlap.trace.Interval` objects, the form the simulator,
the drawer and the metrics below share.

Metrics from a timeline (per rank, optionally per window, e.g. one F&B pair)
----------------------------------------------------------------------------
Let *C* be the union of the compute lanes' intervals and *M* the union of the
communication lanes' intervals, both clipped to the window.

* ``comm`` = |M|, ``compute`` = |C| (busy time; concurrent spans count once);
* ``hidden`` = |M ∩ C|: communication time during which compute was running;
* ``exposed`` = |M| − |M ∩ C|: communication nothing hid;
* ``hidden_fraction`` = hidden / comm (``1.0`` when there is no communication).

Metrics from isolated timings (``docs/overlap.md``; no single standard exists, report all)
----------------------------------------------------------------------------------------
With ``T_comp`` and ``T_comm`` measured alone and ``T_both`` measured overlapped:

* :func:`hidden_fraction` = (T_comp + T_comm − T_both) / T_comm;
* :func:`overlap_efficiency` = (T_comp + T_comm − T_both) / min(T_comp, T_comm) (``1.0``:
  the shorter of the two was completely hidden);
* :func:`exposed_comm` = T_both − T_comp;
* :func:`compute_slowdown` = T_comp_overlapped / T_comp (compute stretched by sharing the
  device with communication kernels).

Values are reported as measured, never clipped: noise can push a fraction slightly
outside ``[0, 1]`` and that is worth seeing.
"""

from __future__ import annotations

import contextvars
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from .trace import Interval

__all__ = [
    "COMPUTE_LANE", "COMM_LANE", "Timeline", "OverlapStats", "IsolatedOverlap",
    "merge", "total", "intersect", "overlap_stats", "overlap_per_window", "windows",
    "hidden_fraction", "overlap_efficiency", "exposed_comm", "compute_slowdown",
    "isolated_overlap",
]

log = logging.getLogger(__name__)

COMPUTE_LANE = "compute"
COMM_LANE = "comm"

_current: contextvars.ContextVar["Timeline | None"] = contextvars.ContextVar(
    "overlap_timeline", default=None)


class _NoSpan:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NO_SPAN = _NoSpan()


class _Open:
    """A span that has begun: ``[lane, action, start, end]`` (floats on the host clock,
    ``torch.cuda.Event`` on the CUDA clock; ``end`` is ``None`` until it ends)."""

    __slots__ = ("lane", "action", "start", "end")

    def __init__(self, lane: str, action: Any, start: Any) -> None:
        self.lane = lane
        self.action = action
        self.start = start
        self.end = None


class _Span:
    __slots__ = ("tl", "lane", "action", "stream", "rec")

    def __init__(self, tl: "Timeline", lane: str, action: Any, stream: Any) -> None:
        self.tl = tl
        self.lane = lane
        self.action = action
        self.stream = stream
        self.rec = None

    def __enter__(self) -> "_Open":
        self.rec = self.tl.begin(self.lane, self.action, self.stream)
        return self.rec

    def __exit__(self, *exc: Any) -> None:
        self.tl.end(self.rec, self.stream)


class Timeline:
    """Spans of one rank, per lane.

    ``device``: a CUDA device records CUDA events on the given (default: current) stream
    of that device, so spans measure GPU execution; ``None`` or a CPU device uses the
    host clock.  ``enabled=False`` makes every call a no-op (spans cost one attribute
    check).  Thread-safe for spans ended from other threads (communication callbacks).
    """

    def __init__(self, rank: int = 0, device: torch.device | str | None = None, *,
                 enabled: bool = True) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be an int >= 0, got {rank!r}")
        self.rank = rank
        self.enabled = bool(enabled)
        dev = torch.device(device) if device is not None else torch.device("cpu")
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"Timeline records on 'cpu' (host clock) or 'cuda' (events), "
                             f"got {dev}")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"Timeline(device={dev}) needs CUDA, which is not available: "
                               "use device=None for the host clock")
        self.device = dev
        self.clock = "cuda" if dev.type == "cuda" else "host"
        self._lock = threading.Lock()
        self._records: list[_Open] = []
        self._origin_host = time.perf_counter()
        self._origin_ev = None
        if self.clock == "cuda":
            self._origin_ev = self._event(None)

    # -- recording ----------------------------------------------------------------------
    def _event(self, stream: Any) -> "torch.cuda.Event":
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream if stream is not None and hasattr(stream, "cuda_stream")
                  else torch.cuda.current_stream(self.device))
        return ev

    def now(self) -> float:
        """Host seconds since the timeline's origin."""
        return time.perf_counter() - self._origin_host

    def span(self, lane: str, action: Any, stream: Any = None):
        """Context manager recording one span of ``action`` (an
        :class:`~dualpipe.schedules.Action` or a label string) on ``lane``; on the CUDA
        clock the events go on ``stream`` (default: the current stream)."""
        if not self.enabled:
            return _NO_SPAN
        return _Span(self, lane, action, stream)

    def begin(self, lane: str, action: Any, stream: Any = None) -> _Open | None:
        """Start a span that :meth:`end` or :meth:`end_at` closes later (possibly from
        another thread, e.g. a communication callback).  ``None`` when disabled."""
        if not self.enabled:
            return None
        start = self._event(stream) if self.clock == "cuda" else time.perf_counter()
        rec = _Open(lane, action, start)
        with self._lock:
            self._records.append(rec)
        return rec

    def end(self, rec: _Open | None, stream: Any = None) -> None:
        """Close ``rec`` now (host clock) or at this point of ``stream`` (CUDA clock)."""
        if rec is None or rec.end is not None:
            return
        rec.end = self._event(stream) if self.clock == "cuda" else time.perf_counter()

    def end_at(self, rec: _Open | None, perf_counter_s: float) -> None:
        """Close ``rec`` at a host time read with ``time.perf_counter()`` (host clock only;
        the first end wins)."""
        if rec is None or rec.end is not None:
            return
        if self.clock != "host":
            raise RuntimeError("end_at() takes a host time; a CUDA-clock timeline ends spans "
                               "with end(rec, stream)")
        rec.end = perf_counter_s

    def add(self, lane: str, action: Any, start: float, end: float) -> None:
        """Add a finished span, ``start``/``end`` in seconds from the origin (host clock)."""
        if not self.enabled:
            return
        if self.clock != "host":
            raise RuntimeError("add() takes host times; record CUDA spans with span()/begin()")
        if not (math.isfinite(start) and math.isfinite(end)) or end < start:
            raise ValueError(f"span {action!r} on {lane!r}: need finite start <= end, got "
                             f"{start}..{end}")
        rec = _Open(lane, action, start + self._origin_host)
        rec.end = end + self._origin_host
        with self._lock:
            self._records.append(rec)

    def clear(self) -> None:
        """Forget all spans (the origin stays)."""
        with self._lock:
            self._records = []

    # -- current timeline ---------------------------------------------------------------
    def activate(self):
        """Context manager making this the :meth:`current` timeline (per thread/task), so
        library code such as :mod:`overlap.fb` records into it without being passed it."""
        return _Activate(self)

    @staticmethod
    def current() -> "Timeline | None":
        """The timeline activated by the innermost ``with tl.activate():``, or ``None``."""
        return _current.get()

    # -- reading ------------------------------------------------------------------------
    def intervals(self, lanes: Iterable[str] | None = None) -> list[Interval]:
        """Finished spans as :class:`~overlap.trace.Interval` (``rank`` = this rank,
        times in seconds from the origin), sorted by start.  On the CUDA clock this waits
        for the recorded events.  Spans not ended yet are left out (logged)."""
        keep = None if lanes is None else set(lanes)
        with self._lock:
            recs = list(self._records)
        out: list[Interval] = []
        open_ = 0
        for r in recs:
            if keep is not None and r.lane not in keep:
                continue
            if r.end is None:
                open_ += 1
                continue
            if self.clock == "cuda":
                r.start.synchronize()
                r.end.synchronize()
                s = self._origin_ev.elapsed_time(r.start) / 1e3
                e = self._origin_ev.elapsed_time(r.end) / 1e3
            else:
                s, e = r.start - self._origin_host, r.end - self._origin_host
            out.append(Interval(self.rank, s, max(s, e), r.action, r.lane))
        if open_:
            log.debug("timeline of rank %d: %d span(s) not ended, left out", self.rank, open_)
        out.sort(key=lambda iv: (iv.start, iv.end))
        return out

    def stats(self, **kwargs: Any) -> "OverlapStats":
        """:func:`overlap_stats` of this timeline's intervals."""
        return overlap_stats(self.intervals(), **kwargs)

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        return f"Timeline(rank={self.rank}, clock={self.clock}, spans={len(self._records)})"


class _Activate:
    __slots__ = ("tl", "token")

    def __init__(self, tl: Timeline) -> None:
        self.tl = tl
        self.token = None

    def __enter__(self) -> Timeline:
        self.token = _current.set(self.tl)
        return self.tl

    def __exit__(self, *exc: Any) -> None:
        _current.reset(self.token)


# -- interval arithmetic ------------------------------------------------------------------
Span = tuple[float, float]


def merge(spans: Iterable[Span]) -> list[Span]:
    """The union of ``(start, end)`` spans as sorted, disjoint spans (touching spans are
    joined; empty ones dropped)."""
    out: list[list[float]] = []
    for s, e in sorted((float(s), float(e)) for s, e in spans):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            if e > out[-1][1]:
                out[-1][1] = e
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def total(spans: Iterable[Span]) -> float:
    """Measure (total length) of the union of ``spans``."""
    return sum(e - s for s, e in merge(spans))


def intersect(a: Iterable[Span], b: Iterable[Span]) -> list[Span]:
    """Intersection of the unions of ``a`` and ``b`` as sorted, disjoint spans."""
    a, b = merge(a), merge(b)
    out: list[Span] = []
    i = j = 0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _clip(spans: Iterable[Span], window: Span | None) -> list[Span]:
    if window is None:
        return list(spans)
    lo, hi = window
    return [(max(s, lo), min(e, hi)) for s, e in spans if min(e, hi) > max(s, lo)]


@dataclass(frozen=True)
class OverlapStats:
    """Overlap of communication with compute on one rank (seconds; see module docs).

    ``comm``/``compute``: busy time of the comm/compute lanes; ``hidden``: comm time
    covered by compute; ``exposed`` = ``comm - hidden``; ``wall``: from the first start to
    the last end of those spans (or the window's length when a window is given);
    ``label``: the window's label, if any.
    """

    comm: float
    compute: float
    hidden: float
    exposed: float
    wall: float
    label: Any = None

    @property
    def hidden_fraction(self) -> float:
        """hidden / comm; ``1.0`` when there was no communication to hide."""
        return self.hidden / self.comm if self.comm > 0 else 1.0

    def to_json(self) -> dict:
        return {"label": None if self.label is None else str(self.label),
                "comm_s": self.comm, "compute_s": self.compute, "hidden_s": self.hidden,
                "exposed_s": self.exposed, "wall_s": self.wall,
                "hidden_fraction": self.hidden_fraction}


def _lane_spans(intervals: Sequence[Interval], lanes: Sequence[str],
                rank: int | None) -> list[Span]:
    keep = set(lanes)
    return [(iv.start, iv.end) for iv in intervals
            if iv.lane in keep and (rank is None or iv.rank == rank)]


def _one_rank(intervals: Sequence[Interval], rank: int | None) -> None:
    if rank is None:
        ranks = {iv.rank for iv in intervals}
        if len(ranks) > 1:
            raise ValueError(f"the intervals come from ranks {sorted(ranks)}: overlap is "
                             "measured per rank, pass rank=")


def _check_lanes(compute_lanes: Sequence[str], comm_lanes: Sequence[str]) -> None:
    if isinstance(compute_lanes, str) or isinstance(comm_lanes, str):
        raise TypeError("compute_lanes and comm_lanes are sequences of lane names, "
                        "e.g. ('compute',), not a bare string")
    both = set(compute_lanes) & set(comm_lanes)
    if both:
        raise ValueError(f"lanes {sorted(both)} are given as both compute and comm lanes")


def overlap_stats(intervals: Sequence[Interval], *,
                  compute_lanes: Sequence[str] = (COMPUTE_LANE,),
                  comm_lanes: Sequence[str] = (COMM_LANE,),
                  rank: int | None = None, window: Span | None = None,
                  label: Any = None) -> OverlapStats:
    """Hidden and exposed communication of one rank (see the module docstring).

    ``intervals`` from several ranks need ``rank=``; ``window=(start, end)`` clips every
    span to that window first.  Raises ``ValueError`` for overlapping lane sets or an
    empty/negative window.
    """
    _check_lanes(compute_lanes, comm_lanes)
    if window is not None and not window[1] > window[0]:
        raise ValueError(f"window {window} is empty: need start < end")
    _one_rank(intervals, rank)
    comp = merge(_clip(_lane_spans(intervals, compute_lanes, rank), window))
    comm = merge(_clip(_lane_spans(intervals, comm_lanes, rank), window))
    t_comp, t_comm = total(comp), total(comm)
    hidden = total(intersect(comp, comm))
    if window is not None:
        wall = window[1] - window[0]
    elif comp or comm:
        both = comp + comm
        wall = max(e for _, e in both) - min(s for s, _ in both)
    else:
        wall = 0.0
    return OverlapStats(comm=t_comm, compute=t_comp, hidden=hidden, exposed=t_comm - hidden,
                        wall=wall, label=label)


def windows(intervals: Sequence[Interval], lane: str, *, rank: int | None = None,
            kinds: Iterable[str] | None = None) -> list[tuple[Any, float, float]]:
    """``(label, start, end)`` of the intervals on ``lane`` (e.g. the runtime's F&B actions
    on ``"compute"``), optionally only actions whose ``kind`` is in ``kinds`` (``{"FB"}``).
    Feed them to :func:`overlap_per_window`."""
    ks = None if kinds is None else set(kinds)
    out = []
    for iv in intervals:
        if iv.lane != lane or (rank is not None and iv.rank != rank):
            continue
        if ks is not None and getattr(iv.action, "kind", None) not in ks:
            continue
        out.append((iv.action, iv.start, iv.end))
    return out


def overlap_per_window(intervals: Sequence[Interval],
                       wins: Iterable[tuple[Any, float, float]],
                       **kwargs: Any) -> list[OverlapStats]:
    """:func:`overlap_stats` inside each ``(label, start, end)`` window (zero-length
    windows are skipped); keyword arguments as for :func:`overlap_stats`."""
    out = []
    for label, s, e in wins:
        if e > s:
            out.append(overlap_stats(intervals, window=(s, e), label=label, **kwargs))
    return out


# -- isolated timings -------------------------------------------------------------------------
def _times(**named: float) -> None:
    for k, v in named.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{k} must be a finite time >= 0 in seconds, got {v!r}")


def hidden_fraction(t_comp: float, t_comm: float, t_both: float) -> float:
    """(T_comp + T_comm − T_both) / T_comm: the share of the communication time that the
    overlapped run did not pay.  Raises ``ValueError`` when ``t_comm`` is 0."""
    _times(t_comp=t_comp, t_comm=t_comm, t_both=t_both)
    if t_comm <= 0:
        raise ValueError("t_comm must be > 0: with no communication nothing can be hidden")
    return (t_comp + t_comm - t_both) / t_comm


def overlap_efficiency(t_comp: float, t_comm: float, t_both: float) -> float:
    """(T_comp + T_comm − T_both) / min(T_comp, T_comm): ``1.0`` when the shorter of the
    two was hidden entirely (the best any overlap can do)."""
    _times(t_comp=t_comp, t_comm=t_comm, t_both=t_both)
    m = min(t_comp, t_comm)
    if m <= 0:
        raise ValueError("t_comp and t_comm must both be > 0 for an overlap efficiency")
    return (t_comp + t_comm - t_both) / m


def exposed_comm(t_comp: float, t_both: float) -> float:
    """T_both − T_comp: the communication time the overlapped run still paid (seconds)."""
    _times(t_comp=t_comp, t_both=t_both)
    return t_both - t_comp


def compute_slowdown(t_comp_overlapped: float, t_comp: float) -> float:
    """T_comp_overlapped / T_comp: how much sharing the device stretched the compute."""
    _times(t_comp_overlapped=t_comp_overlapped, t_comp=t_comp)
    if t_comp <= 0:
        raise ValueError("t_comp must be > 0 for a slowdown")
    return t_comp_overlapped / t_comp


@dataclass(frozen=True)
class IsolatedOverlap:
    """All the isolated-timing metrics of one measurement (times in seconds)."""

    t_comp: float
    t_comm: float
    t_both: float
    hidden_fraction: float
    overlap_efficiency: float
    exposed_comm: float
    compute_slowdown: float | None = None

    def to_json(self) -> dict:
        return dict(self.__dict__)


def isolated_overlap(t_comp: float, t_comm: float, t_both: float,
                     t_comp_overlapped: float | None = None) -> IsolatedOverlap:
    """Every metric of the module docstring from isolated timings; ``compute_slowdown``
    only when the compute time measured during the overlapped run is given."""
    return IsolatedOverlap(
        t_comp=t_comp, t_comm=t_comm, t_both=t_both,
        hidden_fraction=hidden_fraction(t_comp, t_comm, t_both),
        overlap_efficiency=overlap_efficiency(t_comp, t_comm, t_both),
        exposed_comm=exposed_comm(t_comp, t_both),
        compute_slowdown=(None if t_comp_overlapped is None
                          else compute_slowdown(t_comp_overlapped, t_comp)))
