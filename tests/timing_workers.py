"""Functions run on each rank by tests of the runtime's timing and teardown (module level,
so spawned processes import them).  They swap in fake CUDA events and fake NCCL
communicators, so the device-clock and NCCL-teardown logic runs on CPU machines."""
from __future__ import annotations

import gc
import time

import torch

from tests.models import criterion, make_batch
from tests.workers import build, rank_io


class FakeEvent:
    """Stands in for ``torch.cuda.Event``: ``record()`` reads the host clock, and every
    ``synchronize()`` is counted (the runtime must read its events only when asked)."""

    syncs = 0

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self, stream=None) -> None:
        if stream != "the current stream":
            raise AssertionError(f"event recorded on {stream!r}, not the device's current stream")
        self.t = time.perf_counter()

    def synchronize(self) -> None:
        FakeEvent.syncs += 1

    def elapsed_time(self, other: "FakeEvent") -> float:
        if self.t is None or other.t is None:
            raise RuntimeError("elapsed_time of an event that was never recorded")
        return (other.t - self.t) * 1e3


def device_clock_steps(rank: int, world: int, record_timeline: bool = True):
    """DualPipeV on gloo with the runtime forced onto its device-clock path (fake events).

    Returns per step: whether figures were pending and unsynchronized after step(), the
    synchronizations that reading them took, the stats and the timeline."""
    torch.cuda.Event = FakeEvent  # the runtime makes its timing events through this name
    torch.cuda.current_stream = lambda device=None: "the current stream"  # recorded on
    N = 4
    p, s = build("dualpipev", rank, world, N, timeout=60, record_timeline=record_timeline,
                 transport="group")
    p._ev_start = FakeEvent()  # what a CUDA device gets: the device clock's origin
    out = []
    for step in range(2):
        xs, ys = make_batch(step, N, False)
        inputs, labels, _ = rank_io(s, rank, xs, ys)
        before = FakeEvent.syncs
        p.step(*inputs, num_chunks=N, criterion=criterion if labels else None, labels=labels)
        lazy = p._pending is not None and FakeEvent.syncs == before
        st = p.last_stats
        tl = [(iv.start, iv.end, str(iv.action), iv.lane) for iv in p.timeline]
        out.append({"lazy": lazy, "syncs": FakeEvent.syncs - before,
                    "stats": (st.wall, st.busy, st.wait, st.num_compute), "timeline": tl})
    p.close()
    return out


class FakeCommunicator:
    """A private NCCL communicator's stand-in: records which release method was called."""

    def __init__(self, name: str, log: list, methods=("shutdown", "abort")) -> None:
        self.name, self.log = name, log
        for m in methods:
            setattr(self, m, lambda m=m: self.log.append((self.name, m)))


def nccl_teardown(rank: int, world: int):
    """The runtime's handling of its private NCCL communicators on close(), on a failure
    and when garbage-collected (fake communicators adopted by a 1-rank gloo pipeline)."""
    out = {}
    log: list = []
    p, _ = build("dualpipev", rank, world, 2, timeout=30)
    p._own_nccl_groups((FakeCommunicator("up", log), FakeCommunicator("down", log)))
    p.close()
    p.close()
    try:
        p.step(num_chunks=2)
    except RuntimeError as e:
        out["after_close"] = str(e)
    out["close"] = list(log)

    log = []
    p, _ = build("dualpipev", rank, world, 2, timeout=30)
    p._own_nccl_groups((FakeCommunicator("up", log), FakeCommunicator("down", log)))
    err = p._failed(RuntimeError("boom"), "F0.0")
    out["failure_error"] = str(err)
    del p, err
    gc.collect()
    out["failure"] = list(log)  # aborted once; the finalizer must not shut them down again

    log = []
    p, _ = build("dualpipev", rank, world, 2, timeout=30)
    p._own_nccl_groups((FakeCommunicator("up", log, ("_shutdown", "abort")),
                        FakeCommunicator("down", log, ("abort",))))
    del p
    gc.collect()
    out["gc"] = list(log)

    try:  # a bad cap is refused on every backend ...
        build("dualpipev", rank, world, 2, timeout=30, nccl_max_ctas=65)
    except ValueError as e:
        out["bad_cap"] = str(e)
    # ... a good one is ignored where the transport is not NCCL
    p, _ = build("dualpipev", rank, world, 2, timeout=30, nccl_max_ctas=8)
    out["cap_on_gloo"] = p.transport
    p.close()
    return out
