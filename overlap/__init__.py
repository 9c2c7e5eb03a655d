"""Runtime primitives to overlap computation with communication.

* :mod:`overlap.streams` -- compute/communication streams with priorities, events, and a
  CPU twin with the same interface;
* :mod:`overlap.timeline` -- record spans per lane (host clock or CUDA events) and measure
  hidden/exposed communication;
* :mod:`overlap.fb` -- declare a stage as sub-stages (compute / async comm) and get an
  interleaved ``overlapped_forward_backward`` for DualPipe.

Submodules are imported on first use (``import overlap`` imports no torch code and probes
no device); the names below are re-exported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "streams": ("HostStream", "StreamEvent", "StreamPair", "priority_range", "resolve_device"),
    "timeline": ("Timeline", "OverlapStats", "IsolatedOverlap", "overlap_stats",
                 "overlap_per_window", "isolated_overlap", "hidden_fraction",
                 "overlap_efficiency", "exposed_comm", "compute_slowdown"),
    "fb": ("SubStage", "SubStageModule", "CommHandle", "Step", "compute", "comm",
           "run_async", "build_order", "overlapped_forward_backward",
           "plain_forward_backward", "defer_weight_grad"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + ["streams", "timeline", "fb"]


def __getattr__(name: str) -> Any:
    if name in ("streams", "timeline", "fb"):
        return importlib.import_module(f"{__name__}.{name}")
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
