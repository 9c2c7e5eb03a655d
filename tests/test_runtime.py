"""Multi-process runs of every schedule on gloo, checked against a single-process run
of the same micro-batches: losses and outputs bit for bit, gradients within a cosine
distance of 1e-13 (a DualPipe stage's gradient is the sum of its two copies)."""
from __future__ import annotations

import pytest
import torch

from dualpipe.schedules import get_schedule
from dualpipe.simulate import simulate
from tests.models import cosine_distance, reference, sum_stage_grads
from tests.mp import run_ranks
from tests.workers import pipeline_cases


def _num_stages(name, world):
    return 2 * world if name == "dualpipev" else world


def check(name: str, world: int, cases: list[dict]):
    results = run_ranks(pipeline_cases, world, [dict(c, schedule=name) for c in cases],
                        timeout=240)
    for ci, case in enumerate(cases):
        N, steps = case["chunks"], case.get("steps", 1)
        train = case.get("train", True)
        ref_losses, ref_outs, ref_grads = reference(_num_stages(name, world), N, steps,
                                                    case.get("tuple_io", False), train)
        seen_loss = 0
        for rank, per_case in enumerate(results):
            res = per_case[ci]
            if res["loss_slice"] is not None:
                a, b = res["loss_slice"]
                for st in range(steps):
                    got = res["losses"][st]
                    assert got is not None, f"{case}: rank {rank} returned no loss"
                    assert torch.equal(got, ref_losses[st][a:b]), \
                        f"{case}: rank {rank} step {st} loss {got} != reference {ref_losses[st][a:b]}"
                    seen_loss += b - a
                    if case.get("return_outputs"):
                        outs = res["outputs"][st]
                        outs = (outs,) if isinstance(outs, torch.Tensor) else outs
                        for k, o in enumerate(outs):
                            ref = torch.cat([ref_outs[st][i][k] for i in range(a, b)])
                            assert torch.equal(o, ref), f"{case}: output {k} differs on rank {rank}"
            else:
                assert all(x is None for x in res["losses"])
        assert seen_loss == N * steps, f"{case}: losses cover {seen_loss} of {N * steps} micro-batches"
        if train:
            total = sum_stage_grads(per_case[ci]["grads"] for per_case in results)
            assert sorted(total) == sorted(ref_grads)
            for stage, ref in ref_grads.items():
                assert sorted(total[stage]) == sorted(ref), f"stage {stage} params differ"
                for n, r in ref.items():
                    d = cosine_distance(total[stage][n], r)
                    assert d < 1e-13, f"{case}: stage {stage} {n} cosine distance {d}"
                    torch.testing.assert_close(total[stage][n], r, rtol=1e-5, atol=1e-6)
            sim = simulate(get_schedule(name, world, N))
            peaks = [per_case[ci]["peaks"][0] for per_case in results]
            assert peaks == sim.peak_activations, f"{case}: measured peaks {peaks} vs simulated"
        else:
            for per_case in results:
                assert all(not per_case[ci]["grads"].get(s) or not any(per_case[ci]["grads"][s])
                           for s in per_case[ci]["grads"]), "inference produced gradients"
        if case.get("hook") and train:
            assert sum(r[ci]["hook_calls"] for r in results) > 0, "overlapped_forward_backward never called"
        for per_case in results:
            assert per_case[ci]["timeline_len"] > 0
        # every rank is on this host: the default picks shared memory; "group" is gloo
        want = {"auto": "shm", "group": "gloo", "shm": "shm"}[
            case.get("transport", "auto")]
        assert [r[ci]["transport"] for r in results] == [want] * world, case


BASIC = [
    dict(chunks=0),  # placeholder replaced per world below
]


def _cases(lo: int):
    return [
        dict(chunks=lo),
        dict(chunks=lo + 2, steps=2, tuple_io=True, hook=True),
        dict(chunks=lo, preset_shapes=True),
        dict(chunks=lo, split_linear=True, steps=2),
        dict(chunks=lo + 2, train=False, return_outputs=True),
        dict(chunks=lo, train=False, return_outputs=True, tuple_io=True, hook=True),
    ]


@pytest.mark.parametrize("world", [2, 4])
def test_dualpipe(world):
    check("dualpipe", world, _cases(2 * world))


@pytest.mark.slow  # the suite's time: DualPipe on 8 ranks also runs in test_dropin.py's
def test_dualpipe_8_ranks():  # published example; tuple I/O, the hook, eval on 2 and 4 ranks
    check("dualpipe", 8, [dict(chunks=16, steps=2), dict(chunks=20, tuple_io=True, hook=True),
                          dict(chunks=16, train=False, return_outputs=True)])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_dualpipev(world):
    check("dualpipev", world, _cases(2 * world))


def test_dualpipev_8_ranks():
    check("dualpipev", 8, [dict(chunks=16, steps=2, tuple_io=True, hook=True),
                           dict(chunks=18, train=False, return_outputs=True)])


@pytest.mark.parametrize("name", ["1f1b", "zb1p"])
def test_single_stage_schedules(name):
    check(name, 4, [dict(chunks=4), dict(chunks=6, steps=2, tuple_io=True),
                    dict(chunks=8, split_linear=True), dict(chunks=4, train=False,
                                                            return_outputs=True)])


def test_fb_only_without_a_pipeline():
    """fb-only: one rank, F0, F1+B0, ..., B(N-1); with a stage defining
    overlapped_forward_backward every pair goes through it (one module in both roles)."""
    check("fb-only", 1, _cases(4))


@pytest.mark.parametrize("name,world", [("dualpipe", 4), ("dualpipev", 4), ("1f1b", 2)])
def test_on_the_process_groups_gloo(name, world):
    """transport="group": the same runs over the pipeline's private gloo group (the
    transport used across hosts) instead of shared memory."""
    lo = 2 * world
    check(name, world, [dict(chunks=lo, transport="group", steps=2),
                        dict(chunks=lo + 2, transport="group", tuple_io=True,
                             hook=name != "1f1b"),
                        dict(chunks=lo, transport="group", split_linear=True),
                        dict(chunks=lo, transport="group", train=False, return_outputs=True)])


def test_messages_larger_than_the_shared_memory_ring():
    from tests.workers import big_activations
    res = run_ranks(big_activations, 2, timeout=180)
    for rank, r in enumerate(res):
        assert r["group"]["transport"] == "gloo" and r["shm"]["transport"] == "shm"
        if rank == 0:
            assert r["shm"]["loss"] is not None
            assert torch.equal(r["shm"]["loss"], r["group"]["loss"])
        for a, b in zip(r["shm"]["grads"], r["group"]["grads"]):
            assert torch.equal(a, b), f"rank {rank}: gradients differ between transports"


def test_data_by_pipeline_mesh_with_rank_mapping():
    from tests.workers import mesh_dp_pp
    N = 4
    res = run_ranks(mesh_dp_pp, 4, N, timeout=120)
    assert sorted((r["dp"], r["pp_rank"]) for r in res) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for dp in (0, 1):
        # the single-process reference of this replica's data (make_batch(step=dp))
        ref_losses, _, ref_grads = reference(2, N, dp + 1, False)
        replica = [r for r in res if r["dp"] == dp]
        for r in replica:
            a, b = r["loss_slice"]
            # reference() accumulates over steps 0..dp; step dp's losses are the last row
            assert torch.equal(r["loss"], ref_losses[dp][a:b])
            assert r["dp_sum"] == 1.0
        if dp == 0:
            total = {}
            for r in replica:
                for stage, copies in r["grads"].items():
                    for g in copies:
                        for n, t in g.items():
                            total.setdefault(stage, {})
                            total[stage][n] = total[stage][n] + t if n in total[stage] else t
            for stage, ref in ref_grads.items():
                for n, t in ref.items():
                    assert cosine_distance(total[stage][n], t) < 1e-13
