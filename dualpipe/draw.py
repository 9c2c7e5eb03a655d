"""Draw a timeline: simulated or measured intervals -> PNG or Chrome/Perfetto trace.

Input is a list of :class:`~overlap.trace.Interval` (``rank``, ``start``, ``end``,
``action``, ``lane``) and the :class:`~dualpipe.schedules.Schedule` they belong to (for
the placement: which stream and stage each chunk of a rank is).  Times are in any
unit: simulated cost units or measured seconds; ``time_unit`` names it.

* :func:`to_png` draws ranks as rows (rank 0 at the top) against time, one box per
  interval with its micro-batch written inside.  Kinds differ by colour and hatch
  (F, B, I, W, F&B); the two directions of a bidirectional schedule differ by shade
  (DualPipe: stream 0 dark, stream 1 light; DualPipeV: chunk 0, the descending leg of
  the V, dark; chunk 1, the ascending leg, light).  An overlapped F&B pair is one box
  split in two halves, forward left and backward right, with a heavy outline.  Lanes
  other than ``"compute"`` (for example ``"comm"`` in a measured timeline) are thin
  sub-rows under their rank.
* :func:`to_chrome_trace` writes the same intervals as complete (``"ph": "X"``) events
  for ``chrome://tracing`` / https://ui.perfetto.dev.
* :func:`draw` picks one of the two from the file suffix.

The micro-batch number drawn in a box is the step-wide index: DualPipe's stream 1
micro-batch ``i`` is drawn as ``N/2 + i``, so every number names one micro-batch.

matplotlib is imported only when a PNG is drawn (with the Agg backend), so importing
this module and writing traces need no plotting library.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

from .schedules import (B, F, FB, I, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, Schedule,
                        REGISTRY, parse_action)
from .simulate import Interval

__all__ = ["draw", "to_png", "to_chrome_trace", "SUFFIXES", "MissingDrawDependency"]


class MissingDrawDependency(ImportError):
    """A PNG was asked for and matplotlib is not installed (traces need nothing)."""


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDrawDependency(
            f"drawing a PNG needs matplotlib ({exc}): pip install matplotlib (the [draw] "
            "extra of this package); a .json Chrome/Perfetto trace needs nothing") from exc

#: The file suffixes :func:`draw` accepts.
SUFFIXES = (".png", ".json")

COMPUTE_LANE = "compute"

# (dark, light) fill per kind: dark for direction 0, light for direction 1.
_FILL = {
    F: ("#f28e2b", "#ffd3a1"),     # forward: orange
    B: ("#4e9a3f", "#b5dea5"),     # full backward: green
    I: ("#2a9d9a", "#a7e0dc"),     # input-gradient backward: teal, hatched
    W: ("#6f7fd8", "#cdd3f7"),     # deferred weight gradient: indigo, dotted
    SEND_F: ("#8c8c8c", "#cfcfcf"),  # activations: grey
    RECV_F: ("#8c8c8c", "#cfcfcf"),
    SEND_B: ("#a5866b", "#dccbbb"),  # gradients: brown-grey
    RECV_B: ("#a5866b", "#dccbbb"),
}
_HATCH = {F: None, B: None, I: "///", W: "...",
          SEND_F: None, SEND_B: None, RECV_F: "xx", RECV_B: "xx"}
_KIND_LABEL = {
    F: "Forward (F)",
    B: "Backward (B, input + weight)",
    I: "Backward for input (I)",
    W: "Backward for weights (W)",
    FB: "Overlapped forward & backward (F&B)",
    SEND_F: "send activation",
    RECV_F: "receive activation",
    SEND_B: "send gradient",
    RECV_B: "receive gradient",
}
_OTHER_FILL = ("#999999", "#dddddd")  # free labels beyond the palette
# Free labels of measured spans (sub-stages such as "attn" or "dispatch"), in order of
# first appearance; one colour per label, the same for both directions.
_LABEL_PALETTE = ("#e8c15a", "#e07b91", "#8fc1e3", "#b39ddb", "#9ccc65", "#ffab91",
                  "#80cbc4", "#f48fb1", "#bcaaa4", "#c5e1a5")

# Chrome traces count time in microseconds.
_US_PER_UNIT = {"s": 1e6, "ms": 1e3, "us": 1.0, "µs": 1.0, "ns": 1e-3}


def draw(path: str | os.PathLike, intervals: Sequence[Interval], schedule: Schedule,
         title: str | None = None, time_unit: str | None = None) -> None:
    """Write ``intervals`` of ``schedule`` to ``path``: a ``.png`` image or a ``.json``
    Chrome/Perfetto trace, chosen by the suffix (case-insensitive).

    ``time_unit`` names the unit of ``Interval.start``/``end`` (``"s"``, ``"ms"``,
    ``"us"``, ``"ns"``; ``None`` for unitless simulated costs).  ``title`` is used by
    the PNG only.  Raises ``ValueError`` for any other suffix.
    """
    suffix = os.path.splitext(os.fspath(path))[1].lower()
    if suffix == ".png":
        to_png(intervals, schedule, path, title=title, time_unit=time_unit)
    elif suffix == ".json":
        to_chrome_trace(intervals, schedule, path, time_unit=time_unit)
    else:
        raise ValueError(f"cannot draw to {os.fspath(path)!r}: the file name must end in "
                         f"{' or '.join(SUFFIXES)} (PNG image or Chrome/Perfetto trace JSON), "
                         f"got {suffix or 'no suffix'!r}")


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class _Part:
    """One compute or communication part of an interval, as drawn."""

    kind: str
    chunk: int
    mb: int           # micro-batch index within its stream
    global_mb: int    # step-wide micro-batch index (what the PNG writes)
    stream: int
    stage: int
    direction: int    # 0 or 1: which shade


def _where(schedule: Schedule, rank: int, chunk: int) -> tuple[int, int]:
    """``(stream, stage)`` of ``chunk`` on ``rank``; ``(-1, -1)`` when it has none."""
    if 0 <= rank < len(schedule.placement) and 0 <= chunk < len(schedule.placement[rank]):
        return schedule.placement[rank][chunk]
    return -1, -1


def _normalise(intervals: Sequence[Interval]) -> list[Interval]:
    """Intervals whose ``action`` is an :class:`Action`.  Measured timelines may label a
    span with a string: the text form (``"F0.3"``) is parsed, any other label (a
    sub-stage such as ``"dispatch"``) becomes ``Action(kind=label)``."""
    out = []
    for iv in intervals:
        a = iv.action
        if not isinstance(a, Action):
            try:
                a = parse_action(str(a))
            except ValueError:
                a = Action(str(a))
            iv = Interval(iv.rank, iv.start, iv.end, a, iv.lane)
        out.append(iv)
    return out


def _is_label(kind: str) -> bool:
    return kind not in _FILL and kind != FB


def _label_fills(intervals: Sequence[Interval]) -> dict[str, tuple[str, str]]:
    """A colour for each free label (``Action(kind=label)``), in order of appearance."""
    out: dict[str, tuple[str, str]] = {}
    for iv in intervals:
        k = iv.action.kind
        if _is_label(k) and k not in out:
            c = _LABEL_PALETTE[len(out)] if len(out) < len(_LABEL_PALETTE) else _OTHER_FILL[0]
            out[k] = (c, c)
    return out


def _name(p: "_Part", peer: int) -> str:
    """Text of one part: ``"F0.3"``, ``"SF0.3>1"``, or a free label as it is."""
    if _is_label(p.kind) and p.chunk < 0:
        return p.kind
    return str(Action(p.kind, p.chunk, p.mb, peer=peer))


def _direction(schedule: Schedule, rank: int, chunk: int) -> int:
    """0 or 1: the stream for a two-stream schedule, else the leg of the V (chunk)."""
    stream, _ = _where(schedule, rank, chunk)
    if len(schedule.streams) > 1:
        return 1 if stream > 0 else 0
    chunks_here = len(schedule.placement[rank]) if 0 <= rank < len(schedule.placement) else 1
    return 1 if chunks_here > 1 and chunk > 0 else 0


def _parts(schedule: Schedule, iv: Interval) -> list[_Part]:
    a = iv.action
    raw = a.parts() if a.kind in (F, B, I, W, FB) else ((a.kind, a.chunk, a.mb),)
    out = []
    for kind, c, m in raw:
        stream, stage = _where(schedule, iv.rank, c)
        first = schedule.streams[stream].first_microbatch if stream >= 0 else 0
        out.append(_Part(kind, c, m, first + m if m >= 0 else m, stream, stage,
                         _direction(schedule, iv.rank, c)))
    return out


def _check(intervals: Sequence[Interval], schedule: Schedule) -> None:
    for iv in intervals:
        if not 0 <= iv.rank < schedule.num_ranks:
            raise ValueError(f"interval {iv} is on rank {iv.rank}, but schedule "
                             f"{schedule.name!r} has ranks 0..{schedule.num_ranks - 1}: "
                             "pass the schedule the intervals were recorded for")
        if not (math.isfinite(iv.start) and math.isfinite(iv.end)) or iv.end < iv.start:
            raise ValueError(f"interval {iv} has start={iv.start}, end={iv.end}: "
                             "times must be finite with end >= start")


def _lanes(intervals: Sequence[Interval]) -> list[str]:
    """``"compute"`` first, then the other lanes in order of first appearance."""
    seen = [COMPUTE_LANE]
    for iv in intervals:
        if iv.lane not in seen:
            seen.append(iv.lane)
    return seen


def _pretty(name: str) -> str:
    spec = REGISTRY.get(name)
    return spec.title if spec is not None else name


def _default_title(schedule: Schedule) -> str:
    return (f"{_pretty(schedule.name)} — {schedule.num_ranks} ranks × "
            f"{schedule.num_chunks} micro-batches")


def _direction_labels(schedule: Schedule) -> tuple[str, str] | None:
    """Legend text for the two shades, or ``None`` for a one-direction schedule."""
    P = schedule.num_ranks
    if len(schedule.streams) > 1:
        s0, s1 = schedule.streams[0], schedule.streams[1]
        return (f"dark: stream 0, enters at rank 0 "
                f"(micro-batches {s0.first_microbatch}–{s0.first_microbatch + s0.num_microbatches - 1})",
                f"light: stream 1, enters at rank {P - 1} "
                f"(micro-batches {s1.first_microbatch}–{s1.first_microbatch + s1.num_microbatches - 1})")
    if any(len(chunks) > 1 for chunks in schedule.placement):
        spec = REGISTRY.get(schedule.name)
        legs = spec.legs if spec is not None else ("", "")
        out = []
        for c, shade in ((0, "dark"), (1, "light")):
            stages = [chunks[c][1] for chunks in schedule.placement if len(chunks) > c]
            out.append(f"{shade}: chunk {c}{legs[c]} (stages {min(stages)}–{max(stages)})")
        return out[0], out[1]
    return None


# --------------------------------------------------------------------------- Chrome trace


def to_chrome_trace(intervals: Sequence[Interval], schedule: Schedule,
                    path: str | os.PathLike | None = None,
                    time_unit: str | None = None) -> dict[str, Any]:
    """Build (and, with ``path``, write) a Chrome/Perfetto trace of ``intervals``.

    Returns ``{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}``.
    Every part of an interval (two for an ``F&B`` pair, over the same time span, which
    the viewers show stacked) is one complete event ``"ph": "X"`` with ``ts``/``dur``
    in microseconds, measured from the earliest start; ``pid`` is the rank and ``tid``
    the lane's index (``0`` = ``"compute"``, named by ``thread_name`` metadata);
    ``name`` is the part's action text (``"F0.3"``) and ``args`` carry ``kind``,
    ``chunk``, ``mb`` (within its stream), ``microbatch`` (step-wide), ``stream``,
    ``stage`` and the whole ``action``.  Each rank gets ``process_name`` metadata
    ``"rank r"``.  Zero-length intervals (a ``W`` that costs nothing) are left out.

    ``time_unit`` is the unit of the interval times (``"s"``, ``"ms"``, ``"us"``,
    ``"ns"``); unitless simulated costs (``None``) are written as 1 unit = 1 µs.
    Raises ``ValueError`` for an unknown unit or intervals that do not fit ``schedule``.
    """
    if time_unit is not None and time_unit not in _US_PER_UNIT:
        raise ValueError(f"unknown time_unit {time_unit!r}: use one of {sorted(_US_PER_UNIT)} "
                         "or None for unitless simulated costs")
    intervals = _normalise(intervals)
    _check(intervals, schedule)
    scale = _US_PER_UNIT[time_unit] if time_unit else 1.0
    t0 = min((iv.start for iv in intervals), default=0.0)
    lanes = _lanes(intervals)
    lane_id = {name: i for i, name in enumerate(lanes)}
    events: list[dict[str, Any]] = []
    for r in range(schedule.num_ranks):
        events.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0,
                       "args": {"name": f"rank {r}"}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0,
                       "args": {"sort_index": r}})
        for name, tid in lane_id.items():
            events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": tid,
                           "args": {"name": name}})
            events.append({"ph": "M", "name": "thread_sort_index", "pid": r, "tid": tid,
                           "args": {"sort_index": tid}})
    for iv in intervals:
        if iv.end <= iv.start:
            continue
        ts, dur = (iv.start - t0) * scale, (iv.end - iv.start) * scale
        for p in _parts(schedule, iv):
            name = _name(p, iv.action.peer)
            whole = name if len(_parts(schedule, iv)) == 1 else str(iv.action)
            args: dict[str, Any] = {"kind": p.kind, "chunk": p.chunk, "mb": p.mb,
                                    "microbatch": p.global_mb, "stream": p.stream,
                                    "stage": p.stage, "action": whole, "lane": iv.lane}
            if iv.action.kind == FB:
                args["overlapped"] = True
            if iv.action.peer >= 0:
                args["peer"] = iv.action.peer
            events.append({"ph": "X", "name": name, "cat": p.kind, "pid": iv.rank,
                           "tid": lane_id[iv.lane], "ts": ts, "dur": dur, "args": args})
    trace = {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"schedule": schedule.name, "ranks": schedule.num_ranks,
                      "chunks": schedule.num_chunks,
                      "time_unit": time_unit or "unitless (1 unit = 1 us)"},
    }
    if path is not None:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(trace, fh)
    return trace


# --------------------------------------------------------------------------- PNG

_ROW_H = 1.0          # height of a rank's compute lane, in y units
_SUB_H = 0.32         # height of each extra lane
_GAP = 0.28           # space between ranks


def to_png(intervals: Sequence[Interval], schedule: Schedule, path: str | os.PathLike,
           title: str | None = None, time_unit: str | None = None) -> None:
    """Draw ``intervals`` as a rank × time chart and save it as a PNG at ``path``.

    Rows are ranks, rank 0 at the top; the compute lane is a full row, any other lane
    a thin sub-row beneath it.  Every box carries its step-wide micro-batch number
    when it fits.  The right margin gives each rank's idle time on the compute lane
    (span minus busy).  ``title`` defaults to
    ``"<schedule> — <ranks> ranks × <chunks> micro-batches"``; ``time_unit`` labels
    the time axis.  Raises ``ValueError`` when there is nothing to draw or an interval
    does not belong to ``schedule``, :class:`MissingDrawDependency` (an ``ImportError``)
    without matplotlib.
    """
    if not intervals:
        raise ValueError("no intervals to draw: simulate the schedule or record a timeline first")
    intervals = _normalise(intervals)
    _check(intervals, schedule)
    _require_matplotlib()

    # An explicit Agg canvas: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle
    from matplotlib.transforms import blended_transform_factory

    P = schedule.num_ranks
    lanes = _lanes(intervals)
    band = _ROW_H + (len(lanes) - 1) * _SUB_H
    pitch = band + _GAP                              # y units from one rank to the next
    t0 = min(iv.start for iv in intervals)
    span = max(max(iv.end for iv in intervals) - t0, 1e-12)

    def lane_y(rank: int, lane: str) -> tuple[float, float]:
        """Top and height of a lane (the y axis grows downward: rank 0 at the top)."""
        top = rank * pitch
        if lane == COMPUTE_LANE:
            return top, _ROW_H
        return top + _ROW_H + (lanes.index(lane) - 1) * _SUB_H, _SUB_H

    # Width: about a quarter inch per typical compute box (an F&B pair counts as two
    # halves), so that a two-digit number fits; between 10 and 28 inches.
    durs = sorted((iv.end - iv.start) / (2 if iv.action.kind == FB else 1)
                  for iv in intervals if iv.lane == COMPUTE_LANE and iv.end > iv.start)
    typical = durs[len(durs) // 2] if durs else span
    width = min(max(10.0, 2.0 + 0.26 * span / max(typical, 1e-9 * span)), 28.0)
    left_in, right_in = 0.95, 0.8
    top_in, xlab_in = 0.5, 0.55
    plot_in = min(max(1.6, 0.5 * P * pitch), 26.0)
    fig = Figure(figsize=(width, top_in + plot_in + xlab_in + 1.0), dpi=110)
    FigureCanvasAgg(fig)
    renderer = fig.canvas.get_renderer()

    # Legends first: their height decides the bottom margin.
    legends = _legends(fig, intervals, schedule, width - left_in - 0.2, renderer)
    heights = [lg.get_window_extent(renderer).height / fig.dpi for lg in legends]
    legend_in = sum(heights) + 0.1 * len(heights) + 0.1
    height = top_in + plot_in + xlab_in + legend_in
    fig.set_size_inches(width, height)
    y = 0.08
    for lg, h in zip(reversed(legends), reversed(heights)):
        lg.set_bbox_to_anchor((left_in / width, y / height), transform=fig.transFigure)
        y += h + 0.1
    fig.text(1 - 0.1 / width, 0.08 / height, "numbers: micro-batch", ha="right",
             va="bottom", fontsize=7.5, color="#555555")

    ax = fig.add_axes((left_in / width, (xlab_in + legend_in) / height,
                       1 - (left_in + right_in) / width, plot_in / height))
    ax.set_xlim(0, span)
    ax.set_ylim(P * pitch - _GAP + 0.1, -0.1)
    px_per_t = (width - left_in - right_in) * fig.dpi / span
    px_per_y = plot_in * fig.dpi / (P * pitch - _GAP + 0.2)
    font = 8.0

    def fits(text: str, w: float, h: float) -> bool:
        return (w * px_per_t >= len(text) * font * 0.62 * fig.dpi / 72 + 3
                and h * px_per_y >= font * fig.dpi / 72 + 2)

    # Rectangles are grouped by style into one PatchCollection each (fast for long runs).
    groups: dict[tuple[Any, ...], list[Any]] = {}

    def rect(x: float, y: float, w: float, h: float, face: str | None, edge: str,
             lw: float, hatch: str | None = None) -> None:
        groups.setdefault((face, edge, lw, hatch), []).append(Rectangle((x, y), w, h))

    def edge_width(w: float, full: float) -> float:
        """Thinner outlines for boxes only a few pixels wide, so they do not go black."""
        return round(min(full, max(0.15, w * px_per_t / 16)), 2)

    label_fills = _label_fills(intervals)

    def box(x: float, w: float, y: float, h: float, part: _Part) -> None:
        shades = _FILL.get(part.kind) or label_fills.get(part.kind, _OTHER_FILL)
        fill, hatch = shades[part.direction], _HATCH.get(part.kind)
        rect(x, y, w, h, fill, "#333333", edge_width(w, 0.4))
        if hatch:
            # the hatch in the other shade of the same hue: visible on both shades
            rect(x, y, w, h, None, shades[1 - part.direction], 0.0, hatch)
        if part.global_mb >= 0:
            label = str(part.global_mb)
        else:
            label = part.kind if _is_label(part.kind) else ""
        if label and fits(label, w, h):
            ax.text(x + w / 2, y + h / 2, label, ha="center", va="center",
                    fontsize=font, color="#111111",
                    bbox=dict(boxstyle="round,pad=0.12", fc=fill, ec="none") if hatch else None)

    busy = [0.0] * P
    for iv in intervals:
        if iv.end <= iv.start:
            continue
        x, w = iv.start - t0, iv.end - iv.start
        y, h = lane_y(iv.rank, iv.lane)
        if iv.lane == COMPUTE_LANE:
            busy[iv.rank] += w
            y, h = y + 0.06, h - 0.12
        else:
            y, h = y + 0.03, h - 0.06
        parts = _parts(schedule, iv)
        if iv.action.kind == FB:
            box(x, w / 2, y, h, parts[0])
            box(x + w / 2, w / 2, y, h, parts[1])
            rect(x, y, w, h, None, "black", edge_width(w, 1.8))
        else:
            box(x, w, y, h, parts[0])
    # fills first, then hatches, then outlines of pairs
    for (face, edge, lw, hatch), rects in sorted(
            groups.items(), key=lambda kv: (kv[0][0] is None, kv[0][3] is None)):
        ax.add_collection(PatchCollection(
            rects, match_original=False, facecolor=face if face else "none",
            edgecolor=edge, linewidth=lw, hatch=hatch, zorder=2 if face else 2.5))

    ticks = [lane_y(r, COMPUTE_LANE)[0] + _ROW_H / 2 for r in range(P)]
    ax.set_yticks(ticks, [f"rank {r}" for r in range(P)])
    ax.tick_params(axis="y", length=0)
    left_at = blended_transform_factory(ax.transAxes, ax.transData)
    for r in range(P):
        for lane in lanes[1:]:
            y, h = lane_y(r, lane)
            ax.text(-0.004, y + h / 2, lane, transform=left_at, ha="right", va="center",
                    fontsize=6.5, color="#555555")
        ax.text(1.008, ticks[r], f"idle {span - busy[r]:.3g}", transform=left_at,
                ha="left", va="center", fontsize=7.5, color="#555555")
    ax.set_xlabel("time" + (f" ({time_unit})" if time_unit else " (cost units)"))
    ax.grid(axis="x", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.set_title(title if title is not None else _default_title(schedule), fontsize=12,
                 loc="left", fontweight="bold")
    fig.savefig(path, format="png")


def _legends(fig: Any, intervals: Sequence[Interval], schedule: Schedule,
             max_width_in: float, renderer: Any) -> list[Any]:
    """The legend rows: kinds present (with both shades for two directions), then what
    the shades mean.  Each row uses as many columns as fit in ``max_width_in``."""
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.patches import Patch

    dirs = _direction_labels(schedule)
    present = {p.kind for iv in intervals for p in _parts(schedule, iv)}

    def swatch(kind: str, d: int) -> Patch:
        shades = _FILL.get(kind, _OTHER_FILL)
        hatch = _HATCH.get(kind)
        return Patch(facecolor=shades[d], edgecolor=shades[1 - d] if hatch else "#333333",
                     linewidth=0.4, hatch=hatch)

    kinds: list[tuple[Any, str]] = []
    for kind in (F, B, I, W):
        if kind in present:
            kinds.append(((swatch(kind, 0), swatch(kind, 1)) if dirs else swatch(kind, 0),
                          _KIND_LABEL[kind]))
    if any(iv.action.kind == FB for iv in intervals):
        kinds.append(((Patch(facecolor=_FILL[F][0], edgecolor="black", linewidth=1.8),
                       Patch(facecolor=_FILL[B][1], edgecolor="black", linewidth=1.8)),
                      _KIND_LABEL[FB]))
    for kind in (SEND_F, RECV_F, SEND_B, RECV_B):
        if kind in present:
            kinds.append((swatch(kind, 0), _KIND_LABEL[kind]))
    for kind, (fill, _) in _label_fills(intervals).items():
        kinds.append((Patch(facecolor=fill, edgecolor="#333333", linewidth=0.4), kind))
    rows = [kinds]
    if dirs:
        rows.append([(Patch(facecolor="#555555", edgecolor="#333333"), dirs[0]),
                     (Patch(facecolor="#d0d0d0", edgecolor="#333333"), dirs[1])])
    out = []
    for entries in rows:
        handles, labels = [e[0] for e in entries], [e[1] for e in entries]
        for ncol in range(len(entries), 0, -1):
            lg = fig.legend(handles, labels, ncol=ncol, loc="lower left", frameon=False,
                            fontsize=8.5, handlelength=2.6, handleheight=1.1,
                            handler_map={tuple: HandlerTuple(ndivide=None, pad=0.0)},
                            columnspacing=1.8, borderaxespad=0.0, borderpad=0.0)
            if ncol == 1 or lg.get_window_extent(renderer).width / fig.dpi <= max_width_in:
                break
            lg.remove()
        out.append(lg)
    return out
