"""The runtime's timing (one clock per device) and the release of its private NCCL
communicators, tested on CPU with fake CUDA events and fake communicators (how they are
built and released: tests/test_connect.py).

On CUDA every interval of a step is a pair of CUDA events on the current stream; the
conversion to seconds (``dualpipe.runtime.timing.on_device_clock``) and the runtime's lazy
reading of the events are pinned here with fakes; the real device clock is checked by the
``gpu`` test in tests/test_nccl_gpu.py.
"""
from __future__ import annotations

import pytest

from dualpipe.runtime import timing
from tests.mp import run_ranks
from tests.timing_workers import device_clock_steps, nccl_teardown


class Ev:
    """A fake CUDA event at a fixed device time (ms)."""

    def __init__(self, ms):
        self.ms, self.synced = ms, 0

    def synchronize(self):
        self.synced += 1

    def elapsed_time(self, other):
        return other.ms - self.ms


def test_device_clock_places_compute_and_waits_on_one_clock():
    start, end = Ev(100.0), Ev(160.0)
    spans = [(Ev(101.0), Ev(111.0), "F0.0", "compute"),
             (Ev(111.0), Ev(126.0), "F1.0", "wait"),      # the stream stalled 15 ms
             (Ev(126.0), Ev(146.0), "F1.0", "compute"),
             (Ev(146.0), Ev(150.0), "B1.0", "wait")]
    out, wall, busy, wait = timing.on_device_clock(start, end, spans)
    assert out == [(0.001, 0.011, "F0.0", "compute"), (0.011, 0.026, "F1.0", "wait"),
                   (0.026, 0.046, "F1.0", "compute"), (0.046, 0.05, "B1.0", "wait")]
    assert (wall, busy, wait) == pytest.approx((0.060, 0.030, 0.019))
    assert end.synced == 1 and start.synced == 0  # one wait, for the last event


def _check_consistent(stats, timeline):
    wall, busy, wait, n = stats
    comp = [(a, b) for a, b, _t, lane in timeline if lane == "compute"]
    waits = [(a, b) for a, b, _t, lane in timeline if lane == "wait"]
    assert len(comp) == n
    assert busy == pytest.approx(sum(b - a for a, b in comp), abs=1e-12)
    assert wait == pytest.approx(sum(b - a for a, b in waits), abs=1e-12)
    assert all(0 <= a <= b <= wall for a, b, _t, _l in timeline)
    assert busy + wait <= wall
    return waits


def test_runtime_device_clock_is_lazy_and_consistent():
    res = run_ranks(device_clock_steps, 2, timeout=240)
    seen_waits = 0
    for per_rank in res:
        for step in per_rank:
            assert step["lazy"], "step() read its CUDA events (a synchronization)"
            assert step["syncs"] == 1, "reading the stats must wait for the last event once"
            seen_waits += len(_check_consistent(step["stats"], step["timeline"]))
    assert seen_waits > 0  # rank 1 waits for activations: the wait lane is on the same clock


def test_runtime_device_clock_without_timeline_still_gives_stats():
    res = run_ranks(device_clock_steps, 2, False, timeout=240)
    for per_rank in res:
        for step in per_rank:
            wall, busy, wait, n = step["stats"]
            assert step["timeline"] == [] and n > 0 and 0 < busy <= wall


# ---- the private NCCL communicators -------------------------------------------------------

def test_nccl_max_ctas_argument_is_validated():
    from overlap.partition import PartitionConfigError, SMPartition, nccl_max_ctas_of
    assert nccl_max_ctas_of(None) is None and nccl_max_ctas_of(16) == 16
    assert nccl_max_ctas_of(SMPartition(20, "cpu")) == 24           # rounded up on Hopper
    assert nccl_max_ctas_of(SMPartition(100, "cpu", total_sms=200)) == 64  # NCCL's cap
    for bad in (0, 65, 2.5, True, "8"):
        with pytest.raises(PartitionConfigError, match=r"\[1, 64\]"):
            nccl_max_ctas_of(bad)


def test_pipeline_shuts_down_its_nccl_communicators():
    res = run_ranks(nccl_teardown, 1, timeout=120)[0]
    assert res["close"] == [("up", "shutdown"), ("down", "shutdown")]  # once, not twice
    assert "closed" in res["after_close"]
    assert res["failure"] == [("up", "abort"), ("down", "abort")]
    assert "boom" in res["failure_error"]
    assert res["gc"] == [("up", "_shutdown"), ("down", "abort")]
    assert "[1, 64]" in res["bad_cap"] and res["cap_on_gloo"] == "shm"
