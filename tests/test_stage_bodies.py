"""Property test over what a stage may return: new tensors, views, its own inputs passed
through unchanged (float, integer and bool), detached tensors, module buffers, tensors
that autograd saved for another output (see tests/stage_bodies.py for the recipes).

Whatever the body, the pipeline must compute what a single process computes: losses bit
for bit, and for every parameter the same gradient -- ``None`` exactly where the single
process has ``None`` (no gradient reached it), else within a cosine distance of 1e-13.
The runtime releases the memory of sent outputs; this pins that it never releases one
that autograd or the stage still reads (the published reference frees every sent
output, which corrupts the gradients of stages that pass their inputs through).

Multi-process on gloo ranks, on the shared-memory transport and on the process group's
gloo (``transport="group"``).  Hypothesis runs derandomised with few examples (one spawn
of ranks per example); the explicit examples are the cases reported in issue 12.
"""
from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.models import cosine_distance  # noqa: E402
from tests.mp import run_ranks  # noqa: E402
from tests.stage_bodies import (AUX_RECIPES, IDX_RECIPES, MASK_RECIPES, X_RECIPES,  # noqa: E402
                                body_cases, reference, sum_copies)

WORLD = 2
RUNS = settings(max_examples=3, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

recipe = st.tuples(st.sampled_from(X_RECIPES), st.sampled_from(AUX_RECIPES),
                   st.sampled_from(IDX_RECIPES), st.sampled_from(MASK_RECIPES))


@st.composite
def case_sets(draw):
    """Three cases for one spawn of 2 ranks: one per schedule, each with its own bodies,
    transport, micro-batch count, step count and F&B hook."""
    cases = []
    for name in draw(st.permutations(["dualpipev", "dualpipe", "1f1b"])):
        lo = 2 * WORLD if name != "1f1b" else WORLD
        extra = draw(st.integers(0, 2)) * (2 if name == "dualpipe" else 1)
        cases.append({"schedule": name, "chunks": lo + extra,
                      "recipes": draw(st.lists(recipe, min_size=1, max_size=3)),
                      "transport": draw(st.sampled_from(["auto", "group"])),
                      "steps": draw(st.integers(1, 2)),
                      "hook": name != "1f1b" and draw(st.booleans())})
    return cases


def _check(cases, results):
    for ci, case in enumerate(cases):
        nst = 2 * WORLD if case["schedule"] == "dualpipev" else WORLD
        ref_losses, ref_grads = reference(case, nst)
        covered = 0
        for rank, per_case in enumerate(results):
            r = per_case[ci]
            assert r["transport"] == {"auto": "shm", "group": "gloo"}[case["transport"]]
            if r["loss_slice"] is None:
                assert all(x is None for x in r["losses"]), (case, rank)
                continue
            a, b = r["loss_slice"]
            for step, got in enumerate(r["losses"]):
                assert torch.equal(got, ref_losses[step][a:b]), \
                    f"{case}: rank {rank} step {step}: losses {got} != {ref_losses[step][a:b]}"
            covered += b - a
        assert covered == case["chunks"], case
        total = sum_copies(per_case[ci]["grads"] for per_case in results)
        assert sorted(total) == sorted(ref_grads), case
        for stage, ref in ref_grads.items():
            for n, want in ref.items():
                got = total[stage][n]
                if want is None:
                    assert got is None, f"{case}: stage {stage} {n}: a gradient where the " \
                                        "single process has None"
                    continue
                assert got is not None, f"{case}: stage {stage} {n}: None, the single " \
                                        "process has a gradient"
                d = cosine_distance(got, want)
                assert d < 1e-13, f"{case}: stage {stage} {n}: cosine distance {d}"
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _case(name, recipes, transport="auto", chunks=None, steps=1, hook=False):
    lo = 2 * WORLD if name != "1f1b" else WORLD
    return {"schedule": name, "chunks": chunks or lo, "recipes": recipes,
            "transport": transport, "steps": steps, "hook": hook}


# issue 12: `return y, idx` (ids passed through next to the output) gave wrong gradients
# with no error; a float tensor passed through made the backward crash
PASS_THROUGH = [("fresh", "pass", "pass", "pass")]
# ... and a stage whose outputs are detached left the earlier stages with zero gradients
# where a single process has None
DETACHING = [("fresh", "fresh", "pass", "pass"), ("detached", "detached", "pass", "pass")]
ISSUE_CASES = [_case("dualpipev", PASS_THROUGH, "auto", steps=2),
               _case("dualpipev", PASS_THROUGH, "group"),
               _case("dualpipe", PASS_THROUGH, "group", hook=True),
               _case("dualpipev", DETACHING, "auto", steps=2, hook=True)]
# every recipe at least once: identity, detached (None gradients upstream), shared,
# views of inputs and of new tensors, buffers
EVERY_RECIPE = [_case("dualpipev", [("identity", "fresh", "view", "new"),
                                    ("detached", "view", "buffer", "pass"),
                                    ("shared", "fresh", "new", "new")], "auto", chunks=6),
                _case("dualpipe", [("view", "fresh", "buffer", "new")], "auto", steps=2),
                _case("1f1b", [("detached", "pass", "pass", "new")], "group", chunks=3)]


@RUNS
@example(cases=ISSUE_CASES)
@example(cases=EVERY_RECIPE)
@given(cases=case_sets())
def test_any_stage_body_matches_a_single_process(cases):
    results = run_ranks(body_cases, WORLD, cases, timeout=240)
    _check(cases, results)


def test_a_view_output_is_sent_and_warned_about_once():
    """A view of a new tensor is sent correctly; its memory cannot be released after
    sending, which one warning per pipeline says.  A view of an input warns not."""
    cases = [_case("dualpipev", [("view", "fresh", "pass", "pass")], steps=2),
             _case("dualpipev", [("fresh", "fresh", "pass", "pass"),
                                 ("fresh", "view", "view", "pass")])]
    results = run_ranks(body_cases, WORLD, cases, timeout=120)
    _check(cases, results)
    warned = [w for per_case in results for w in per_case[0]["warnings"] if "view" in w]
    assert len(warned) == WORLD, warned   # once per pipeline (each rank sends a view)
    assert all(".clone()" in w for w in warned)
    assert not [w for per_case in results for w in per_case[1]["warnings"]]


def test_sent_outputs_are_released_exactly_when_nothing_reads_them():
    """The memory half of the rule: a new tensor that only the runtime holds is emptied
    once sent (so activations do not pile up until the backward); inputs passed through,
    views, detached and integer tensors, and tensors autograd saved are left intact.
    (The stage keeps Python references to what it returned to look at them.)"""
    from tests.stage_bodies import released_outputs
    recipes = [("fresh", "fresh", "new", "new"), ("shared", "fresh", "pass", "pass"),
               ("view", "view", "view", "pass"), ("detached", "detached", "buffer", "new"),
               ("identity", "fresh", "pass", "pass")]
    want = [[True, True, False, False], [False, True, False, False], [False] * 4, [False] * 4,
            [False, True, False, False]]
    res = run_ranks(released_outputs, WORLD, recipes, timeout=120)
    for rec, w, got in zip(recipes, want, res[0]):
        assert got["released"] == w, (rec, got)
        assert got["kept"] == [not x for x in w], (rec, got)
        ref_losses, _ = reference({"recipes": [rec], "chunks": 4}, 2 * WORLD)
        assert torch.equal(got["loss"], ref_losses[0]), rec


def test_reduce_dualpipe_grads_keeps_none():
    """DualPipe: after reduce_dualpipe_grads each copy holds the stage's whole gradient,
    and a stage no gradient reached (its outputs are detached) keeps None on both."""
    case = _case("dualpipe", [("detached", "detached", "pass", "pass")], steps=2)
    case["reduce"] = True
    results = run_ranks(body_cases, WORLD, [case], timeout=120)
    _, ref = reference(case, WORLD)
    assert all(g is None for g in ref[0].values()) and all(g is not None
                                                           for g in ref[1].values())
    for per_case in results:
        for stage, (copy,) in per_case[0]["grads"].items():
            for n, want in ref[stage].items():
                if want is None:
                    assert copy[n] is None, (stage, n)
                else:
                    torch.testing.assert_close(copy[n], want, rtol=1e-5, atol=1e-6)
