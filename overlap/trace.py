"""Trace data: the record of what ran where and when, shared by every layer.

An :class:`Interval` is one span of work on one rank.  :class:`overlap.timeline.Timeline`
produces them from measurements (seconds from its origin), ``dualpipe.simulate`` from a
cost model (simulated units), and ``dualpipe.draw`` and the overlap metrics of
:mod:`overlap.timeline` read them.  The type lives here, in the lower layer, so that
``overlap`` needs nothing from ``dualpipe``; this module imports neither torch nor
``dualpipe``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Interval"]


@dataclass(frozen=True, slots=True)
class Interval:
    """One action on one rank from ``start`` to ``end`` (simulated units or seconds).

    ``action`` says what ran: a ``dualpipe.schedules.Action`` for pipeline actions, or a
    label string for other spans (e.g. the sub-stages of :mod:`overlap.fb`).  ``lane``
    separates kinds of work on a rank in measured timelines (``"compute"``, ``"comm"``,
    ...)."""

    rank: int
    start: float
    end: float
    action: Any
    lane: str = "compute"
