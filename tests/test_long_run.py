"""Long training runs: no growth of live tensors or memory between steps, losses equal
to a single-process run of the same model and optimizer step by step, gradients
neither lost nor doubled when steps accumulate without ``zero_grad``.

The default variant trains 30 steps (DualPipe on 4 ranks, DualPipeV on 2) inside the
shared rank session of :func:`tests.long_workers.run_session` (one spawn per schedule
for this file and ``test_state.py``); ``./run test --slow`` adds 200-step runs.

Why the losses are bit-equal and to what: SGD with momentum over 30/200 steps makes
every later loss depend on every earlier gradient, so the comparison is only exact if
the reference adds the micro-batch gradients in the same order as the pipeline.
DualPipeV runs a stage's micro-batches in order 0..N-1, like a plain single-process
loop.  DualPipe gives each copy of a stage one direction's micro-batches
(0..N/2-1 and N/2..N-1) and :func:`dualpipe.reduce_dualpipe_grads` adds the two
partial sums, so its gradient is ``(g_0 + ... + g_{N/2-1}) + (g_{N/2} + ... +
g_{N-1})``: the reference sums in that order (``halves=True``) and the losses are
then bit-equal for every step.  Against a reference that sums 0..N-1 in one run the
step-0 losses are still bit-equal (they precede any update), and later steps differ
by float32 rounding of the summation order (about 1-2 ulp, relative 2e-7, not growing
over the steps); those are compared with ``rtol=1e-6``.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

from tests import long_workers as lw
from tests.mp import run_ranks

MiB = 1 << 20
RSS_SLACK = 1 * MiB   # allowed RSS growth between the compared steps (allocator noise)
NAMES = list(lw.SESSIONS)


def _check_flat_memory(res: list[dict], first: int, last: int, steps_seen: list[int]):
    """Tensor count and bytes equal at every measured step >= ``first``, RSS growth
    from ``first`` to ``last`` within RSS_SLACK, on every rank."""
    for rank, r in enumerate(res):
        mem = r["mem"]
        assert sorted(mem) == sorted(steps_seen), (rank, sorted(mem))
        base = mem[first]
        for k in steps_seen:
            if k < first:
                continue
            m = mem[k]
            assert m["count"] == base["count"], \
                (f"rank {rank}: {m['count']} live tensors after {k} steps, "
                 f"{base['count']} after {first}")
            assert m["bytes"] == base["bytes"] and m["storage_bytes"] == base["storage_bytes"], \
                f"rank {rank}: tensor bytes {m} after {k} steps vs {base} after {first}"
        grow = mem[last]["rss"] - base["rss"]
        assert grow <= RSS_SLACK, \
            f"rank {rank}: RSS grew by {grow / MiB:.2f} MiB from step {first} to {last}"


def _check_losses(name: str, res: list[dict], N: int, steps: int):
    """Bit-equal to the reference summing in the pipeline's order for every step;
    against the plain-order reference step 0 bit-equal and steps 1..19 within 1e-6."""
    world = len(res)
    nst = lw.num_stages(name, world)
    same_order = lw.reference_training(nst, N, steps, lw.LR, lw.MOMENTUM,
                                       halves=name == "dualpipe")
    plain = lw.reference_training(nst, N, min(steps, 20), lw.LR, lw.MOMENTUM)
    covered = 0
    for rank, r in enumerate(res):
        if r["loss_slice"] is None:
            assert all(x is None for x in r["losses"])
            continue
        a, b = r["loss_slice"]
        got = torch.tensor(r["losses"])
        assert got.shape == (steps, b - a)
        for st in range(steps):
            ref = same_order[st][a:b]
            assert torch.equal(got[st], ref), \
                f"{name} rank {rank} step {st}: loss {got[st].tolist()} != reference {ref.tolist()}"
        assert torch.equal(got[0], plain[0][a:b])
        for st in range(1, len(plain)):
            torch.testing.assert_close(got[st], plain[st][a:b], rtol=1e-6, atol=0,
                                       msg=lambda m, st=st: f"{name} rank {rank} step {st}: {m}")
        covered += b - a
    assert covered == N
    # it trains: the loss falls
    assert float(same_order[-1].mean()) < float(same_order[0].mean())


@pytest.mark.parametrize("name", NAMES)
def test_no_growth_of_live_tensors_or_rss(name):
    res = lw.session_part(name, "train")
    _check_flat_memory(res, 10, lw.SESSION_CFG["steps"], lw.SESSION_CFG["measure_at"])


@pytest.mark.parametrize("name", NAMES)
def test_losses_equal_single_process_training_step_by_step(name):
    res = lw.session_part(name, "train")
    world, N = lw.SESSIONS[name]
    _check_losses(name, res, N, lw.SESSION_CFG["steps"])


@pytest.mark.parametrize("part", ["accumulate", "accumulate_split"])
@pytest.mark.parametrize("name", NAMES)
def test_gradients_accumulate_over_steps_exactly_once(name, part):
    """step(batch 0) then step(batch 1) without zero_grad gives every copy of every
    stage bit for bit the gradient of a single-process run accumulating both batches
    in the same order, and (within rounding) the sum of the two steps' gradients taken
    separately: no micro-batch's gradient lost or counted twice, with and without
    deferred weight gradients (``split_linear_weight_grads``)."""
    res = lw.session_part(name, part)
    world, N = lw.SESSIONS[name]
    nst = lw.num_stages(name, world)
    ref1 = lw.reference_copy_grads(name, nst, N, 1)
    ref2 = lw.reference_copy_grads(name, nst, N, 2)
    seen = set()
    for rank, r in enumerate(res):
        assert r["split_layers"] == (4 if part == "accumulate_split" else 0)
        for (c, pname), g01 in r["g01"].items():
            key = tuple(r["placement"][c])
            seen.add(key)
            g0, g1 = r["g0"][(c, pname)], r["g1"][(c, pname)]
            where = f"{name} rank {rank} chunk {c} (stream {key[0]} stage {key[1]}) {pname}"
            assert torch.equal(g0, ref1[key][pname]), f"{where}: one step differs"
            assert torch.equal(g01, ref2[key][pname]), f"{where}: two accumulated steps differ"
            # the same in other words: g(0 then 1) == g(0) + g(1) up to rounding, far
            # from g(0) alone (lost) or 2 g(1) + g(0) (doubled)
            torch.testing.assert_close(g01, g0 + g1, rtol=1e-5, atol=1e-6, msg=where)
            assert not torch.allclose(g01, g0, rtol=1e-3) and \
                not torch.allclose(g01, g0 + 2 * g1, rtol=1e-3), where
    assert seen == set(ref2), f"stage copies seen {sorted(seen)} vs {sorted(ref2)}"


# ----------------------------------------------------------------------------- slow

LONG_STEPS = 200
LONG_MEASURE = [1, 20, 50, 100, 150, 200]


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_200_steps(name):
    """200 steps with SGD(momentum): live tensors and their bytes identical from step
    20 to step 200 on every rank, RSS within 1 MiB, every step's losses bit-equal to
    the same-order reference (and the first 20 within 1e-6 of the plain-order one).
    Writes the measured figures to ``$DUALPIPE_LONG_RUN_JSON`` when it is set."""
    world, N = lw.SESSIONS[name]
    res = run_ranks(lw.train, world, name, N, LONG_STEPS, lw.LR, lw.MOMENTUM, LONG_MEASURE,
                    timeout=900)
    report = {"schedule": name, "ranks": world, "chunks": N, "steps": LONG_STEPS,
              "mem": [{k: r["mem"][k] for k in (20, LONG_STEPS)} for r in res]}
    path = os.environ.get("DUALPIPE_LONG_RUN_JSON")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(report) + "\n")
    _check_flat_memory(res, 20, LONG_STEPS, LONG_MEASURE)
    _check_losses(name, res, N, LONG_STEPS)
