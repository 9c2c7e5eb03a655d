"""Drop-in fidelity with ``deepseek-ai/DualPipe``: the published examples' calling
convention runs unchanged on CPU ranks and passes the published checks (losses bitwise
equal to a single-process run, every gradient within the published cosine measure
< 1e-13 -- for DualPipe after adding the partner rank's copy of each stage -- and the
inference step's losses and outputs bitwise equal), with no warning on any rank."""
from __future__ import annotations

import pytest

from tests.dropin_workers import module_containers, published_example
from tests.mp import run_ranks


def _check(results, schedule, world):
    for rank, r in enumerate(results):
        assert r["warnings"] == [], f"rank {rank} warned: {r['warnings']}"
        assert r["train_loss_ok"], f"{schedule} {world} ranks: rank {rank} training losses"
        assert r["train_outputs_none"]
        assert max(r["grad_diffs"]) < 1e-13, (rank, r["grad_diffs"])
        assert r["infer_loss_ok"], f"rank {rank} inference losses"
        assert r["infer_outputs_ok"], f"rank {rank} inference outputs"


@pytest.mark.parametrize("world", [2, 4, 8])
def test_published_dualpipe_example(world):
    _check(run_ranks(published_example, world, "dualpipe", timeout=240), "dualpipe", world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_published_dualpipev_example(world):
    _check(run_ranks(published_example, world, "dualpipev", timeout=240), "dualpipev", world)


def test_stage_containers_as_the_reference_accepts():
    res = run_ranks(module_containers, 2, timeout=120)
    for r in res:
        for kind in ("tuple", "list", "ModuleList", "Sequential"):
            assert r[kind] == (True, True), (kind, r[kind])
        assert "needs 2 nn.Module stage(s)" in r["three"] and "Sequential of 3" in r["three"]
        assert "needs 2 nn.Module stage(s)" in r["one"] and "one Stage" in r["one"]
        assert r["pipeline_sequential"] and r["pipeline_modulelist"]


def test_sequence_length_changes_and_declared_shapes():
    """Without declared shapes the sequence length may change from step to step (shapes
    exchanged again; losses still bitwise equal to one process).  With
    set_p2p_tensor_shapes declared, a step with another sequence length is an argument
    error at the start of the step on every rank (the pipeline stays usable) until the
    shapes are declared anew; a declaration wrong from the start stops the pipeline at
    the first send with an error that names rank and action once."""
    from tests.dropin_workers import declared_shapes
    res = run_ranks(declared_shapes, 2, timeout=180)
    r0, r1 = res
    for r in res:
        for key in ("declared", "same_again", "redeclared"):
            assert r[key][0] == "ok", (key, r[key])
        assert all(o[0] == "ok" for o in r["free"]), r["free"]
        assert r["new_seq"][0] == "ValueError", r["new_seq"]
        assert r["new_seq"][2] < 10, r["new_seq"]
        assert r["indivisible"][0] == "ValueError", r["indivisible"]
    for key in ("declared", "same_again", "redeclared"):
        assert r0[key][1] is True, key            # losses equal the single process
        assert r1[key][1] is None
    assert [o[1] for o in r0["free"]] == [True] * 5
    msg = r0["new_seq"][1]
    assert "declared the boundary shapes [[2, 8, 4]]" in msg and "float32[8, 12, 4]" in msg, msg
    assert "set_p2p_tensor_shapes(None)" in msg, msg
    assert "rank(s) [0] rejected" in r1["new_seq"][1], r1["new_seq"]
    assert "not divisible into 4 micro-batches" in r0["indivisible"][1], r0["indivisible"]
    for rank, r in enumerate(res):
        typ, msg, _ = r["wrong"]
        assert typ == "PipelineError", r["wrong"]
        assert "pipeline rank 0, action F0.0: ValueError: the stage sends shapes [[2, 8, 4]] " \
               "but set_p2p_tensor_shapes declared [[2, 8, 5]]" in msg, msg
        assert msg.count("pipeline rank 0, action") == 1, msg


def test_forgetting_old_sequence_lengths_is_the_same_on_every_rank():
    from tests.dropin_workers import many_lengths
    r0, r1 = run_ranks(many_lengths, 2, timeout=120)
    assert r0[0::2] == [True] * 9, r0        # losses equal one process at every step
    assert r0[1::2] == r1 == [1, 2, 3, 3, 3, 3, 3, 3, 3], (r0, r1)


def test_gradient_none_in_some_micro_batches_only_is_an_error_on_every_rank():
    from tests.dropin_workers import none_layout_changes
    res = run_ranks(none_layout_changes, 2, timeout=120)
    for typ, msg, took in res:
        assert typ == "PipelineError", (typ, msg)
        assert "pipeline rank 1, action" in msg and "which input gradients are None changed " \
               "from [grad] to [None]" in msg, msg
        assert took < 15, took


def test_stage_output_changing_shape_is_an_error_on_every_rank():
    from tests.dropin_workers import output_shape_changes
    res = run_ranks(output_shape_changes, 2, timeout=120)
    for typ, msg, took in res:
        assert typ == "PipelineError", (typ, msg)
        assert msg.startswith("pipeline rank 0, action F0.1: stage output changed"), msg
        assert took < 15, took
