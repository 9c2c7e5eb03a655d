"""Property-based tests over randomly drawn (schedule, ranks, chunks, costs).

For every draw: ``validate()`` passes; ``simulate()`` completes, runs every action of
the schedule exactly once and in program order, never overlaps two actions of a rank,
starts no action before its inputs exist (plus the link latency across ranks), and
reports makespan >= every rank's busy time and bubble >= 0; ``lower()`` pairs every
send with one receive, in the same order on every (sender, receiver) channel, keeps
the compute order and places each transfer between its producer and its consumer.
A handful of small draws run through the real runtime on gloo: per-rank peak
activations (counted by the stages themselves and reported by the runtime) equal the
simulator's, losses equal a single-process run bit for bit.

Hypothesis runs derandomised (a fixed example sequence), without a database and with
a small ``max_examples``, so the suite is deterministic and quick.  Costs are drawn as
multiples of 1/8 so every simulated time is exact in binary floating point and the
checks can compare exactly.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from dualpipe.schedules import (B, F, I, RECV_B, RECV_F, SEND_B, SEND_F, W,  # noqa: E402
                                COMPUTE_KINDS, get_schedule, lower)
from dualpipe.simulate import Costs, simulate  # noqa: E402
from dualpipe.validate import validate  # noqa: E402
from tests.models import cosine_distance, reference, sum_stage_grads  # noqa: E402

PURE = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
RUNTIME = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- strategies

def _min_chunks(name: str, P: int) -> int:
    return 2 * P if name in ("dualpipe", "dualpipev") else P


@st.composite
def schedule_args(draw, names=("dualpipe", "dualpipev", "1f1b", "zb1p"), max_ranks=10,
                  max_extra=12):
    name = draw(st.sampled_from(names))
    if name == "dualpipe":
        P = 2 * draw(st.integers(1, max_ranks // 2))
    else:
        P = draw(st.integers(1, max_ranks if name != "dualpipev" else max(1, max_ranks // 2)))
    extra = draw(st.integers(0, max_extra))
    if name == "dualpipe":
        extra -= extra % 2
    return name, P, _min_chunks(name, P) + extra


EIGHTHS = st.integers(0, 32).map(lambda k: k / 8)   # 0 .. 4 in steps of 1/8, exact


@st.composite
def cost_sets(draw):
    b = draw(EIGHTHS)
    w = draw(st.integers(0, int(b * 8)).map(lambda k: k / 8))
    fb = draw(st.none() | EIGHTHS)
    latency = draw(st.integers(0, 8).map(lambda k: k / 8))
    return Costs(f=draw(EIGHTHS), b=b, w=w, fb=fb, latency=latency)


# ----------------------------------------------------------------------------- helpers

def _deps_ok(s, res):
    """Every interval starts after what its parts need: F after the previous stage's F,
    B/I after the next stage's B/I (the last stage after its own F), W after its I;
    crossing ranks adds the latency."""
    lat = res.costs.latency
    fdone, bdone, idone = {}, {}, {}
    for iv in res.intervals:
        for kind, c, m in iv.action.parts():
            stream, stage = s.placement[iv.rank][c]
            if kind == F:
                fdone[(stream, stage, m)] = (iv.end, iv.rank)
            elif kind in (B, I):
                bdone[(stream, stage, m)] = (iv.end, iv.rank)
                if kind == I:
                    idone[(iv.rank, c, m)] = iv.end
    for iv in res.intervals:
        for kind, c, m in iv.action.parts():
            stream, stage = s.placement[iv.rank][c]
            last = stage == s.streams[stream].num_stages - 1
            if kind == F and stage > 0:
                need = fdone[(stream, stage - 1, m)]
            elif kind in (B, I) and last:
                need = (fdone[(stream, stage, m)][0], iv.rank)
            elif kind in (B, I):
                need = bdone[(stream, stage + 1, m)]
            elif kind == W:
                need = (idone[(iv.rank, c, m)], iv.rank)
            else:
                continue
            t, r = need
            earliest = t + (lat if r != iv.rank else 0.0)
            assert iv.start >= earliest, \
                f"{iv.action} on rank {iv.rank} starts at {iv.start} before its input at {earliest}"


def _message(s, rank, a):
    """The identity of the tensor a send/receive moves: (F|B, stream, receiving stage, mb)."""
    stream, stage = s.placement[rank][a.chunk]
    if a.kind == SEND_F:
        return (F, stream, stage + 1, a.mb)
    if a.kind == SEND_B:
        return (B, stream, stage - 1, a.mb)
    return (F if a.kind == RECV_F else B, stream, stage, a.mb)


# ----------------------------------------------------------------------------- pure properties

@PURE
@given(args=schedule_args(), costs=cost_sets())
def test_validate_and_simulate_properties(args, costs):
    name, P, N = args
    s = get_schedule(name, P, N)
    validate(s)
    res = simulate(s, costs)
    # makespan, busy, idle, bubble
    assert len(res.busy) == P and len(res.idle) == P
    assert res.makespan >= max(res.busy)
    assert all(i >= 0 for i in res.idle)
    assert res.bubble >= 0 and res.bubble == max(res.idle)
    # every action exactly once, on its rank, in program order, with its cost
    seen = Counter((iv.rank, iv.action) for iv in res.intervals)
    want = Counter((r, a) for r, acts in enumerate(s.actions) for a in acts)
    assert seen == want and max(seen.values()) == 1
    by_rank = [[iv for iv in res.intervals if iv.rank == r] for r in range(P)]
    for r in range(P):
        assert [iv.action for iv in by_rank[r]] == list(s.actions[r])
        prev_end = 0.0
        for iv in by_rank[r]:
            assert iv.start >= prev_end, f"rank {r}: {iv.action} overlaps the previous action"
            assert iv.end - iv.start == costs.of(iv.action)
            assert iv.end <= res.makespan
            prev_end = iv.end
        assert sum(iv.end - iv.start for iv in by_rank[r]) == res.busy[r]
    _deps_ok(s, res)
    # activations: never negative, back to zero, the peak as the simulator reports
    for r, acts in enumerate(s.actions):
        live = peak = 0
        for a in acts:
            for kind, _c, _m in a.parts():
                live += kind == F
                live -= kind in (B, I)
                assert live >= 0
                peak = max(peak, live)
        assert live == 0 and peak == res.peak_activations[r]


@PURE
@given(args=schedule_args())
def test_lower_pairs_sends_and_receives_in_channel_order(args):
    name, P, N = args
    s = get_schedule(name, P, N)
    low = lower(s)
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for r, acts in enumerate(low):
        # the compute order is the schedule's
        assert [a for a in acts if a.kind in COMPUTE_KINDS] == list(s.actions[r])
        done: set = set()       # (F|B, chunk, mb) computed so far on this rank
        have: set = set()       # (F|B, chunk, mb) inputs received so far
        for a in acts:
            if a.kind in (SEND_F, SEND_B):
                assert a.peer != r
                # sent after the compute that produced it
                assert (F if a.kind == SEND_F else B, a.chunk, a.mb) in done, (r, a)
                sent.setdefault((r, a.peer), []).append(_message(s, r, a))
            elif a.kind in (RECV_F, RECV_B):
                assert a.peer != r
                key = (F if a.kind == RECV_F else B, a.chunk, a.mb)
                assert key not in done, f"rank {r}: {a} after the compute that needs it"
                have.add(key)
                received.setdefault((a.peer, r), []).append(_message(s, r, a))
            else:
                for kind, c, m in a.parts():
                    if kind == W:
                        continue
                    k = F if kind == F else B
                    stream, stage = s.placement[r][c]
                    nst = s.streams[stream].num_stages
                    src = stage - 1 if k == F else stage + 1
                    if 0 <= src < nst:
                        owner = s.stage_owner[(stream, src)][0]
                        if owner != r:
                            assert (k, c, m) in have, f"rank {r}: {a} before receiving its input"
                    done.add((k, c, m))
    assert sent == received, "a channel's sends and receives differ or are out of order"
    # exactly one transfer per cross-rank edge and direction
    expect = 0
    for si, stream in enumerate(s.streams):
        for stage in range(stream.num_stages - 1):
            if s.stage_owner[(si, stage)][0] != s.stage_owner[(si, stage + 1)][0]:
                expect += 2 * stream.num_microbatches
    msgs = [m for lst in sent.values() for m in lst]
    assert len(msgs) == expect and len(set(msgs)) == expect


@pytest.mark.parametrize("name,P,N", [("dualpipe", 2, 4), ("dualpipev", 1, 2), ("1f1b", 1, 1),
                                      ("zb1p", 3, 3)])
def test_smallest_cases_hold_the_properties(name, P, N):
    """The edges hypothesis may not reach in a few examples, through the same checks."""
    test_validate_and_simulate_properties.hypothesis.inner_test(
        args=(name, P, N), costs=Costs(f=1, b=2, w=1, fb=2.5, latency=0.5))
    test_lower_pairs_sends_and_receives_in_channel_order.hypothesis.inner_test(args=(name, P, N))


# ----------------------------------------------------------------------------- runtime

@st.composite
def runtime_cases(draw):
    """One set of ranks (2 or 3) and three small cases of different schedules valid
    for it (one spawn of ranks per example: starting ranks costs seconds)."""
    world = draw(st.sampled_from([2, 3]))
    names = ("dualpipev", "1f1b", "zb1p") + (("dualpipe",) if world == 2 else ())
    cases = []
    for name in draw(st.permutations(names))[:3]:
        extra = draw(st.integers(0, 4))
        if name == "dualpipe":
            extra -= extra % 2
        dual = name in ("dualpipe", "dualpipev")
        cases.append({"schedule": name, "chunks": _min_chunks(name, world) + extra,
                      "steps": draw(st.integers(1, 2)),
                      "split_linear": draw(st.booleans()),
                      "tuple_io": draw(st.booleans()),
                      # the minimal example runs the overlapped_forward_backward hook
                      "hook": dual and not draw(st.booleans())})
    return world, cases


@RUNTIME
@given(drawn=runtime_cases())
def test_runtime_matches_simulator_and_reference(drawn):
    from tests import long_workers as lw
    from tests.mp import run_ranks
    world, cases = drawn
    results = run_ranks(lw.random_cases, world, cases, timeout=240)
    for ci, case in enumerate(cases):
        name, N, steps = case["schedule"], case["chunks"], case["steps"]
        s = get_schedule(name, world, N)
        sim = simulate(s)
        nst = 2 * world if name == "dualpipev" else world
        ref_losses, _, ref_grads = reference(nst, N, steps, case["tuple_io"])
        covered = 0
        for rank, per_case in enumerate(results):
            r = per_case[ci]
            for st_i in range(steps):
                assert r["peaks"][st_i] == sim.peak_activations[rank], (case, rank, r["peaks"])
                counted, left = r["counted_peaks"][st_i]
                assert counted == sim.peak_activations[rank] and left == 0, \
                    (case, rank, r["counted_peaks"], sim.peak_activations)
            if r["loss_slice"] is None:
                assert all(x is None for x in r["losses"])
                continue
            a, b = r["loss_slice"]
            for st_i in range(steps):
                assert torch.equal(r["losses"][st_i], ref_losses[st_i][a:b]), (case, rank, st_i)
            covered += b - a
        assert covered == N, case
        total = sum_stage_grads(per_case[ci]["grads"] for per_case in results)
        assert sorted(total) == sorted(ref_grads)
        for stage, ref in ref_grads.items():
            for n, t in ref.items():
                assert cosine_distance(total[stage][n], t) < 1e-13, (case, stage, n)
                torch.testing.assert_close(total[stage][n], t, rtol=1e-5, atol=1e-6)
