"""overlap.timeline: interval arithmetic, overlap metrics (exact values), recording."""
import math
import threading
import time

import pytest
import torch

from dualpipe.schedules import Action, FB
from dualpipe.simulate import Interval
from overlap.timeline import (IsolatedOverlap, OverlapStats, Timeline, compute_slowdown,
                              exposed_comm, hidden_fraction, intersect, isolated_overlap, merge,
                              overlap_efficiency, overlap_per_window, overlap_stats, total,
                              windows)


def iv(start, end, lane, action="x", rank=0):
    return Interval(rank, start, end, action, lane)


# -- interval arithmetic ------------------------------------------------------------------
def test_merge_joins_overlapping_and_touching_and_drops_empty():
    assert merge([(3, 4), (0, 1), (0.5, 2), (2, 2.5), (5, 5)]) == [(0, 2.5), (3, 4)]
    assert merge([]) == []
    assert total([(0, 2), (1, 3), (10, 11)]) == 4


def test_intersect_exact():
    a = [(0, 4), (6, 10)]
    b = [(1, 2), (3, 7), (9, 12)]
    assert intersect(a, b) == [(1, 2), (3, 4), (6, 7), (9, 10)]
    assert intersect(a, []) == []


# -- metrics from a timeline --------------------------------------------------------------
def test_overlap_stats_hand_made():
    # compute busy [0,4] and [6,10] -> 8; comm [3,7] and [9,12] (+ a duplicate) -> 7
    ivs = [iv(0, 4, "compute"), iv(6, 10, "compute"),
           iv(3, 7, "comm"), iv(9, 12, "comm"), iv(9.5, 11, "comm")]
    s = overlap_stats(ivs)
    assert (s.compute, s.comm, s.hidden, s.exposed, s.wall) == (8, 7, 3, 4, 12)
    assert s.hidden_fraction == 3 / 7
    j = s.to_json()
    assert j["hidden_s"] == 3 and j["hidden_fraction"] == 3 / 7


def test_overlap_stats_window_and_lanes():
    ivs = [iv(0, 4, "sub.compute"), iv(6, 10, "sub.compute"), iv(3, 7, "sub.comm"),
           iv(0, 100, "compute", Action(FB, 0, 1, 1, 0))]  # the container must not count
    s = overlap_stats(ivs, compute_lanes=("sub.compute",), comm_lanes=("sub.comm",),
                      window=(2, 8), label="w")
    # compute in window: [2,4] + [6,8] = 4; comm [3,7] = 4; hidden [3,4] + [6,7] = 2
    assert (s.compute, s.comm, s.hidden, s.exposed, s.wall, s.label) == (4, 4, 2, 2, 6, "w")
    s2 = overlap_stats(ivs)  # default lanes: only the container on "compute", no comm
    assert s2.comm == 0 and s2.hidden_fraction == 1.0


def test_overlap_per_window_with_fb_windows():
    fb1, fb2 = Action(FB, 0, 1, 1, 0), Action(FB, 1, 1, 0, 2)
    ivs = [iv(0, 10, "compute", fb1), iv(10, 20, "compute", fb2),
           iv(12, 13, "compute", Action("F", 0, 3)),  # not an FB: not a window
           iv(0, 5, "sub.compute"), iv(2, 8, "sub.comm"),
           iv(10, 20, "sub.compute"), iv(11, 12, "sub.comm")]
    wins = windows(ivs, "compute", kinds={FB})
    assert [w[0] for w in wins] == [fb1, fb2]
    stats = overlap_per_window(ivs, wins, compute_lanes=("sub.compute",), comm_lanes=("sub.comm",))
    assert [(s.label, s.comm, s.hidden, s.exposed) for s in stats] == [
        (fb1, 6, 3, 3), (fb2, 1, 1, 0)]
    assert stats[1].hidden_fraction == 1.0


def test_overlap_stats_needs_rank_for_several_ranks_and_checks_arguments():
    ivs = [iv(0, 1, "compute", rank=0), iv(0, 2, "comm", rank=1)]
    with pytest.raises(ValueError, match="rank="):
        overlap_stats(ivs)
    assert overlap_stats(ivs, rank=1).comm == 2
    with pytest.raises(ValueError, match="both compute and comm"):
        overlap_stats(ivs, rank=0, compute_lanes=("a",), comm_lanes=("a",))
    with pytest.raises(TypeError, match="not a bare string"):
        overlap_stats(ivs, rank=0, compute_lanes="compute")
    with pytest.raises(ValueError, match="empty"):
        overlap_stats(ivs, rank=0, window=(3, 3))


# -- metrics from isolated timings --------------------------------------------------------
def test_isolated_metrics_exact():
    # compute 10, comm 4 alone; together 11 -> 3 of the 4 hidden
    assert hidden_fraction(10, 4, 11) == 0.75
    assert overlap_efficiency(10, 4, 11) == 0.75
    assert overlap_efficiency(2, 4, 5) == 0.5  # min(2, 4) = 2, 1 saved
    assert hidden_fraction(2, 4, 5) == 0.25
    assert exposed_comm(10, 11) == 1
    assert compute_slowdown(12, 10) == 1.2
    r = isolated_overlap(10, 4, 11, t_comp_overlapped=10.5)
    assert r == IsolatedOverlap(10, 4, 11, 0.75, 0.75, 1, 1.05)
    assert isolated_overlap(10, 4, 14).hidden_fraction == 0.0  # fully serial
    assert isolated_overlap(10, 4, 10).hidden_fraction == 1.0  # fully hidden
    assert r.to_json()["exposed_comm"] == 1


def test_isolated_metrics_reject_bad_times():
    with pytest.raises(ValueError, match="t_comm must be > 0"):
        hidden_fraction(1, 0, 1)
    with pytest.raises(ValueError, match="finite time"):
        hidden_fraction(1, -1, 1)
    with pytest.raises(ValueError, match="finite time"):
        exposed_comm(float("nan"), 1)
    with pytest.raises(ValueError, match="both be > 0"):
        overlap_efficiency(0, 1, 1)
    with pytest.raises(ValueError, match="t_comp must be > 0"):
        compute_slowdown(1, 0)


# -- recording ----------------------------------------------------------------------------
def test_timeline_records_spans_in_seconds_sorted():
    tl = Timeline(rank=3)
    with tl.span("compute", "a"):
        time.sleep(0.002)
    rec = tl.begin("comm", "b")
    tl.add("compute", Action("F", 0, 1), 1.0, 1.5)
    tl.end(rec)
    tl.end(rec)  # idempotent
    ivs = tl.intervals()
    assert [i.action for i in ivs] == ["a", "b", Action("F", 0, 1)]
    assert all(i.rank == 3 for i in ivs)
    a = ivs[0]
    assert 0.0015 < a.end - a.start < 0.5
    assert ivs[2].start == pytest.approx(1.0) and ivs[2].end == pytest.approx(1.5)
    assert [i.action for i in tl.intervals(lanes=["comm"])] == ["b"]
    assert len(tl) == 3
    tl.clear()
    assert tl.intervals() == []


def test_timeline_end_from_another_thread_and_open_spans_left_out():
    tl = Timeline()
    rec = tl.begin("comm", "async")
    t_end = []

    def worker():
        time.sleep(0.001)
        t_end.append(time.perf_counter())
        tl.end_at(rec, t_end[0])

    th = threading.Thread(target=worker)
    th.start()
    th.join()
    tl.begin("comm", "never ended")
    ivs = tl.intervals()
    assert [i.action for i in ivs] == ["async"]
    assert ivs[0].end == pytest.approx(t_end[0] - tl._origin_host)


def test_timeline_disabled_and_current():
    tl = Timeline(enabled=False)
    with tl.span("compute", "a"):
        pass
    assert tl.begin("comm", "b") is None
    tl.add("compute", "c", 0, 1)
    assert tl.intervals() == []
    assert Timeline.current() is None
    on = Timeline()
    with on.activate():
        assert Timeline.current() is on
        with Timeline(rank=1).activate() as inner:
            assert Timeline.current() is inner
        assert Timeline.current() is on
    assert Timeline.current() is None


def test_timeline_argument_errors():
    with pytest.raises(ValueError, match="rank"):
        Timeline(rank=-1)
    with pytest.raises(ValueError, match="host clock|'cpu'"):
        Timeline(device="meta")
    tl = Timeline()
    with pytest.raises(ValueError, match="start <= end"):
        tl.add("compute", "a", 2.0, 1.0)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            Timeline(device="cuda")


def test_stats_from_timeline():
    tl = Timeline()
    tl.add("compute", "c", 0.0, 2.0)
    tl.add("comm", "m", 1.0, 4.0)
    s = tl.stats()
    assert isinstance(s, OverlapStats)
    assert (s.compute, s.comm, s.hidden, s.exposed) == pytest.approx((2, 3, 1, 2))
    assert math.isclose(s.hidden_fraction, 1 / 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_timeline_cuda_events():
    tl = Timeline(device="cuda")
    a = torch.randn(2048, 2048, device="cuda")
    with tl.span("compute", "mm"):
        for _ in range(10):
            a = a @ a / 2048
    ivs = tl.intervals()
    assert len(ivs) == 1 and ivs[0].end > ivs[0].start >= 0
