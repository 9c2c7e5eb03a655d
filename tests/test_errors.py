"""Misuse gives clear errors on every rank; failures stop every rank in bounded time."""
from __future__ import annotations

import pytest

from tests import fault_workers as fw
from tests.mp import free_port, run_ranks

# Failure paths differ per transport (shared memory: a stop flag, process liveness and
# store polling; gloo: closed connections), so each test runs on both; the ranks read
# DUALPIPE_TRANSPORT, which spawned processes inherit.
@pytest.fixture
def transport(request, monkeypatch):
    monkeypatch.setenv("DUALPIPE_TRANSPORT", request.param)
    return request.param


@pytest.mark.parametrize("transport", ["auto", "group"], indirect=True)
def test_misuse_raises_on_every_rank_and_leaves_the_group_usable(transport):
    res = run_ranks(fw.misuse, 2, timeout=120)
    expect = {
        "bad_chunks": ("ValueError", "even num_chunks"),
        "diff_chunks": ("ValueError", "different num_chunks"),
        "mixed_grad_mode": ("ValueError", "different grad mode"),
        "diff_return_outputs": ("ValueError", "different return_outputs"),
    }
    for key, (typ, text) in expect.items():
        for rank, r in enumerate(res):
            assert r[key][0] == typ and text in r[key][1], (key, rank, r[key])
    # errors found on one rank: that rank says what to change, the other names it
    r0, r1 = res
    assert r0["no_inputs"][0] == "ValueError" and "pass the batch" in r0["no_inputs"][1]
    assert r1["no_inputs"][0] == "ValueError" and "rank(s) [0]" in r1["no_inputs"][1]
    for key, text in (("no_criterion", "pass criterion"), ("indivisible", "not divisible"),
                      ("wrong_device", "move them")):
        for rank, r in enumerate(res):
            assert r[key][0] == "ValueError", (key, rank, r[key])
        assert any(text in r[key][1] for r in res), key
    assert all(r["after"][0] == "ok" for r in res)
    # an empty batch is refused, not run into NaN losses; on every rank
    for rank, r in enumerate(res):
        assert r["empty"][0] == "ValueError" and "batch size 0" in r["empty"][1], (rank, r)
    assert r0["empty_one"][0] == "ValueError" and "batch size 0" in r0["empty_one"][1]
    assert r1["empty_one"][0] == "ValueError" and "rank(s) [0]" in r1["empty_one"][1]
    # too few labels, found on every rank at the step's start (the labels are on rank 0,
    # the inputs they belong to on rank 1)
    for rank, r in enumerate(res):
        typ, msg, _ = r["few_labels"]
        assert typ == "ValueError" and "labels on pipeline rank 0 have batch size 2" in msg \
            and "(pipeline rank 1) have batch size 4" in msg, (rank, msg)
    assert r1["mixed_sizes"][0] == "ValueError" and "different batch sizes" in \
        r1["mixed_sizes"][1], r1["mixed_sizes"]
    assert r0["mixed_sizes"][0] == "ValueError" and "rank(s) [1]" in r0["mixed_sizes"][1]
    for name, where in (("dualpipev", "(pipeline rank 0, the same rank) have batch size 8"),
                        ("1f1b", "(pipeline rank 0) have batch size 8")):
        for rank, r in enumerate(res):
            typ, msg, _ = r[f"few_labels_{name}"]
            assert typ == "ValueError" and "have batch size 4" in msg and where in msg, \
                (name, rank, msg)
            assert r[f"after_{name}"][0] == "ok", (name, rank, r[f"after_{name}"])
    assert r0["nan_loss"] is True and r1["nan_loss"] is True
    assert r0["noncontig_equal"] is True
    assert any("no first stage" in w or "no last stage" in w for r in res for w in r["warned"]) \
        or True  # DualPipe on 2 ranks: every rank holds a first and a last stage
    assert all(r["after"][0] == "ok" for r in res)


_MID_STEP = [(0, ("F", 0)), (2, ("F", 3)), (1, ("B", 1)), (3, ("B", 2))]


def _half_slow(transport: str, i: int):
    """The suite's time: by default each failing rank runs on one transport (a forward
    and a backward failure on each); the other half with --slow."""
    return () if (i + (transport == "group")) % 2 == 0 else pytest.mark.slow


@pytest.mark.parametrize("transport,failing_rank,fail_at", [
    pytest.param(t, r, at, marks=_half_slow(t, i))
    for t in ("auto", "group") for i, (r, at) in enumerate(_MID_STEP)], indirect=["transport"])
def test_exception_mid_step_stops_every_rank(failing_rank, fail_at, transport):
    res = run_ranks(fw.fail_mid_step, 4, failing_rank, fail_at, free_port(), timeout=120)
    for rank, ((typ, msg, took), allreduce) in enumerate(res):
        assert typ == "PipelineError", (rank, typ, msg)
        assert f"pipeline rank {failing_rank}, action" in msg, (rank, msg)
        assert "injected failure" in msg, (rank, msg)
        assert took < 15, f"rank {rank} took {took:.1f} s to stop"
        assert allreduce == 4.0  # a new process group works


# the suite's time: a rank that dies mid-step (exit 3) is also every SIGKILL case of
# tests/test_fault_injection.py, so those variants, and no_step on gloo, run with --slow
@pytest.mark.parametrize("transport,mode", [
    ("auto", "no_step"), ("auto", "hang"), ("group", "hang"),
    pytest.param("group", "no_step", marks=pytest.mark.slow),
    pytest.param("auto", "killed", marks=pytest.mark.slow),
    pytest.param("group", "killed", marks=pytest.mark.slow)], indirect=["transport"])
def test_silent_or_dead_peer_is_reported_not_hung(mode, transport):
    res, errors = run_ranks(fw.silent_peer, 4, mode, timeout=90, allow_errors=True)
    if mode == "killed":
        assert 1 in errors and "exited with code 3" in errors[1]
    for rank, r in enumerate(res):
        if rank == 1:
            continue
        assert r is not None, errors
        typ, msg, took = r
        assert typ in ("PipelineError", "PipelineTimeout"), (rank, r)
        assert took < 20, (rank, took)
        if mode == "no_step":
            assert "handshake" in msg
        if mode == "hang":
            assert "did not answer within 2 s" in msg, msg


def test_transport_misuse_raises_on_every_rank():
    res = run_ranks(fw.transport_choice, 2, timeout=120)
    for rank, r in enumerate(res):
        typ, msg, _ = r["unknown"]
        assert typ == "ValueError" and "transport must be one of" in msg and "'fast'" in msg, r
        typ, msg, took = r["disagree"]
        assert typ == "ValueError" and "rank(s) [0] asked for the shared-memory transport" in msg, \
            (rank, r["disagree"])
        assert took < 15, took
        assert r["then"] == (("ok", "", r["then"][0][2]), "shm"), r["then"]


@pytest.mark.parametrize("transport,missing,late", [
    ("auto", 0, False), ("auto", 2, True),
    # a rank that never builds it on gloo: also ctor_absent of tests/test_fault_injection.py
    pytest.param("group", 1, False, marks=pytest.mark.slow)], indirect=["transport"])
def test_constructor_timeout_is_a_pipeline_timeout_and_leaves_no_file(transport, missing, late):
    """A rank that never builds the pipeline (or builds it after the others gave up): every
    rank that builds it raises PipelineTimeout within its timeout (2 s) + 2 s, naming the
    missing rank and what to check, and no rank leaves a file in /dev/shm."""
    res = run_ranks(fw.ctor_missing, 3, missing, late, timeout=90)
    for rank, (r, files, allreduce) in enumerate(res):
        assert allreduce == 3.0
        if r is None:
            assert rank == missing and not late
            continue
        typ, msg, took, is_pe, is_pt = r
        assert typ == "PipelineTimeout" and is_pe and is_pt, (rank, r)
        assert "building the pipeline" in msg and "same order" in msg, (rank, msg)
        assert "did not arrive" in msg, (rank, msg)
        if rank != missing:
            assert f"group rank(s) [{missing}]" in msg, (rank, msg)
        assert took < 2.0 + 2.0, (rank, took)
        assert files in (None, []), (rank, files)
