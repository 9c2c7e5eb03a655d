"""What a step measured: :class:`StepStats` and the intervals of
:attr:`PipelineRuntime.timeline <dualpipe.runtime.PipelineRuntime.timeline>`.

One clock per device.  On CPU the executor reads the host clock around every action and
hands over finished figures.  On CUDA it records a pair of events per action on the
current stream and hands over a :class:`DeviceStep`; :class:`StepTiming` reads the events
only when :attr:`~StepTiming.last_stats` or :attr:`~StepTiming.timeline` is first asked
for after the step (:func:`on_device_clock`), so a step that nobody inspects costs two
event records per action and no synchronization.  Lane names are those of
:mod:`overlap.timeline` (``compute``) plus ``wait`` for waits on receives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from overlap.timeline import COMPUTE_LANE

from ..schedules import Action, parse_action
from ..simulate import Interval

__all__ = ["StepStats", "DeviceStep", "StepTiming", "on_device_clock", "COMPUTE_LANE",
           "WAIT_LANE"]

WAIT_LANE = "wait"


@dataclass
class StepStats:
    """Measured figures of the last step on this rank (seconds).

    ``wall``: the step's duration; ``busy``: the sum of its compute actions (F, B, I,
    W, F&B); ``wait``: the sum of its waits on receives; ``idle = wall - busy``.  One
    clock for all three and for :attr:`PipelineRuntime.timeline`: the host clock on CPU,
    the device clock on CUDA (see :class:`PipelineRuntime`).
    """

    wall: float = 0.0
    busy: float = 0.0
    wait: float = 0.0
    peak_activations: int = 0
    num_compute: int = 0

    @property
    def idle(self) -> float:
        return self.wall - self.busy


@dataclass
class DeviceStep:
    """A finished step's CUDA events, read when its figures are first asked for."""

    start: Any          # event recorded when step() began (the clock's origin)
    end: Any            # event recorded after the last send was waited for
    spans: list         # (begin event, end event, action text, lane) in recording order
    record: bool        # keep the intervals (record_timeline)
    peak: int
    num_compute: int


def on_device_clock(start, end, spans) -> tuple[list[tuple], float, float, float]:
    """Place a step's intervals on the device clock.

    ``start``/``end``: events recorded on the current stream when the step began and
    after it ended; ``spans``: ``(begin, end, text, lane)`` event pairs recorded on the
    same stream.  Waits for ``end`` (so for every event before it).  Returns the
    intervals as ``(a, b, text, lane)`` in seconds from ``start``, and ``wall`` (start
    to end), ``busy`` (sum of the ``compute`` intervals) and ``wait`` (sum of the
    ``wait`` intervals), in seconds, all from the same events.
    """
    end.synchronize()
    out, busy, wait = [], 0.0, 0.0
    for e0, e1, text, lane in spans:
        a, b = start.elapsed_time(e0) / 1e3, start.elapsed_time(e1) / 1e3
        out.append((a, b, text, lane))
        if lane == COMPUTE_LANE:
            busy += b - a
        else:
            wait += b - a
    return out, start.elapsed_time(end) / 1e3, busy, wait


_parse_memo: dict[str, Action] = {}


def parse_cached(text: str) -> Action:
    """``parse_action(text)``, memoized (a step's intervals name the same actions)."""
    a = _parse_memo.get(text)
    if a is None:
        a = _parse_memo[text] = parse_action(text)
    return a


class StepTiming:
    """The timing side of :class:`~dualpipe.runtime.PipelineRuntime` (a mixin): the last
    step's figures, finished by the executor (:meth:`_host_step_done`,
    :meth:`_device_step_done`) and read lazily on CUDA."""

    rank: int
    _pending: DeviceStep | None
    _times: list[tuple]
    _last_stats: StepStats
    _events: list

    def _init_timing(self, device: torch.device) -> None:
        self._times = []
        self._last_stats = StepStats()
        self._pending = None  # CUDA: events of the last step, unread
        self._events = []
        self._ev_start = torch.cuda.Event(enable_timing=True) \
            if device.type == "cuda" else None

    @property
    def timeline(self) -> list[Interval]:
        """The last step's intervals on this rank, seconds from the step's start
        (lane ``compute`` for F/B/I/W/F&B, lane ``wait`` for waits on receives), on the
        clock described in the class docstring."""
        if self._pending is not None:
            self._resolve()
        return [Interval(self.rank, a, b, act, lane) for (a, b, act, lane) in self._times]

    @property
    def last_stats(self) -> StepStats:
        """:class:`StepStats` of the last successful step on this rank."""
        if self._pending is not None:
            self._resolve()
        return self._last_stats

    def _resolve(self) -> None:
        """Read the last step's CUDA events (waits for its last one)."""
        p, self._pending = self._pending, None
        spans, wall, busy, wait = on_device_clock(p.start, p.end, p.spans)
        self._last_stats = StepStats(wall=wall, busy=busy, wait=wait,
                                     peak_activations=p.peak, num_compute=p.num_compute)
        self._times = [(a, b, parse_cached(t), lane) for (a, b, t, lane) in spans] \
            if p.record else []

    def _take_events(self, n: int) -> list:
        """``n`` timing events, reused from step to step (grown as needed)."""
        while len(self._events) < n:
            self._events.append(torch.cuda.Event(enable_timing=True))
        return self._events

    def _host_step_done(self, stats: StepStats, times: list | None) -> None:
        """A CPU step's figures (``times``: its ``(a, b, text, lane)`` intervals, or
        ``None`` when the timeline is not recorded)."""
        self._last_stats = stats
        if times is not None:
            self._times = [(a, b, parse_cached(t), lane) for (a, b, t, lane) in times]

    def _device_step_done(self, step: DeviceStep) -> None:
        """A CUDA step's events, read on first access."""
        self._pending = step
