"""Around the optimizer: clip_grad_norm_ and data parallel x pipeline, multi-process on
gloo, against torch.nn.utils.clip_grad_norm_ on the single-process model."""
from __future__ import annotations

import math

import pytest
import torch

from tests.models import Stage, cosine_distance, criterion, make_batch, microbatch_losses
from tests.mp import run_ranks
from tests.training_workers import clip_norms, dp_pp


def _num_stages(name, ranks):
    return 2 * ranks if name == "dualpipev" else ranks


def _reference(num_stages: int, N: int, batches):
    """Single process: every micro-batch of every batch in ``batches`` (step ids of
    make_batch), gradients summed, then divided by the number of batches."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = [Stage(s) for s in range(num_stages)]
        losses = []
        for b in batches:
            (x,), (y,) = make_batch(b, N, False)
            losses.append(microbatch_losses(stages, x, y, N, criterion))
        for st in stages:
            for q in st.parameters():
                q.grad /= len(batches)
        return stages, losses
    finally:
        torch.set_num_threads(threads)


def _summed(results, key="grads"):
    """{stage: {param: grad}} from the primary copy of every stage (after
    reduce_dualpipe_grads both DualPipe copies must be equal: checked here too)."""
    out = {}
    for res in results:
        for stage, copies in res[key].items():
            for g in copies:
                if stage in out:
                    for n, t in g.items():
                        assert torch.equal(out[stage][n], t), f"copies of stage {stage} {n} differ"
                else:
                    out[stage] = g
    return out


def _compare_grads(got, stages):
    for i, st in enumerate(stages):
        for n, q in st.named_parameters():
            d = cosine_distance(got[i][n], q.grad)
            assert d < 1e-13, f"stage {i} {n}: cosine distance {d}"
            torch.testing.assert_close(got[i][n], q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,ranks,N", [("dualpipe", 4, 8), ("dualpipev", 2, 4),
                                          ("1f1b", 2, 4)])
def test_clip_grad_norm_equals_torch_on_the_single_process_model(name, ranks, N):
    results = run_ranks(clip_norms, ranks, name, N, timeout=240)
    stages, _ = _reference(_num_stages(name, ranks), N, [0])
    params = [q for st in stages for q in st.parameters()]
    ref = [torch.nn.utils.clip_grad_norm_(params, 1e9, math.inf),
           torch.nn.utils.clip_grad_norm_(params, 1e9, 1.0),
           torch.nn.utils.clip_grad_norm_(params, 0.05)]
    assert ref[2] > 0.05, "the test must actually clip"
    for res in results:
        for got, want in zip(res["norms"], ref):
            assert got.dtype == torch.float32 and got.shape == ()
            torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
        assert torch.equal(res["norms"][2], results[0]["norms"][2]), "ranks disagree on the norm"
    _compare_grads(_summed(results), stages)
    for rank, res in enumerate(results):
        e = res["errors"]
        assert e["clip before step"].startswith("RuntimeError") and "before any step" in \
            e["clip before step"], e
        assert e["bad max_norm"].startswith("ValueError"), e
        if name == "dualpipe":
            assert "sync_grads(pipe, dp_group)" in e["clip before reduce"], e
            assert "reduce_dualpipe_grads(pipe)) before" in e["clip before reduce"], e
            assert "already summed" in e["reduce twice"], e


@pytest.mark.parametrize("name,dp,pp,N", [("dualpipe", 2, 4, 8), ("dualpipev", 2, 4, 8),
                                          ("dualpipe", 3, 2, 4)])
def test_data_parallel_times_pipeline_equals_the_full_batch(name, dp, pp, N):
    """Each replica trains on its own batch; after reduce_dualpipe_grads +
    all_reduce_grads (average), and after sync_grads on the same step, every stage's
    gradient is the single-process gradient of the full batch / dp, both DualPipe
    copies of a stage are bitwise equal (also with DP = 3, where a ring all-reduce's
    order depends on where an element sits in the buffer), sync_grads equals the two
    calls bit for bit at DP = 2, and the clipped norm is torch's on that model."""
    results = run_ranks(dp_pp, dp * pp, name, dp, N, timeout=300)
    stages, ref_losses = _reference(_num_stages(name, pp), N, list(range(dp)))
    norm = torch.nn.utils.clip_grad_norm_([q for st in stages for q in st.parameters()], 0.05)
    seen = 0
    for res in results:
        if res["loss_slice"] is not None:
            a, b = res["loss_slice"]
            assert torch.equal(res["loss"], ref_losses[res["replica"]][a:b])
            seen += b - a
        torch.testing.assert_close(res["norm"], norm, rtol=1e-6, atol=0)
        errors = res["errors"]
        assert "before any step" in errors["all_reduce before step"]
        assert "before any step" in errors["sync before step"]
        assert errors["sync with a bad group"].startswith("TypeError") and \
            "ProcessGroup" in errors["sync with a bad group"]
        if name == "dualpipe":
            assert "already summed" in errors["reduce after sync"], errors
        else:  # nothing to sum: a no-op
            assert errors["reduce after sync"] == "ok"
    assert seen == dp * N
    for d in range(dp):  # every replica ends with the same (averaged, clipped) gradients
        mine = [r for r in results if r["replica"] == d]
        _compare_grads(_summed(mine), stages)
        # unclipped (the cosine distance does not see the clip's scale); _summed checks
        # that both DualPipe copies of every stage are bitwise equal
        two, synced = _summed(mine, "grads_two_calls"), _summed(mine, "grads_sync")
        for i, st in enumerate(stages):
            for n, q in st.named_parameters():
                assert cosine_distance(two[i][n], q.grad) < 1e-13, (i, n)
                assert cosine_distance(synced[i][n], q.grad) < 1e-13, (i, n)
                if dp == 2:  # a + b in either order: the two ways agree bit for bit
                    assert torch.equal(synced[i][n], two[i][n]), (i, n)


def test_sync_grads_keeps_none_where_the_two_calls_do():
    """DualPipe 2 x 2 with a parameter only some micro-batches use (so some copies and
    replicas have its gradient and others not) and one none uses: sync_grads gives every
    parameter a gradient exactly where reduce_dualpipe_grads + all_reduce_grads do, with
    the same bits (DP = 2), on both copies of every stage, averaged and summed."""
    from tests.training_workers import sync_none_grads
    results = run_ranks(sync_none_grads, 4, 2, 4, timeout=300)
    had = [h for r in results for h in r["extra_before"]]
    assert any(had) and not all(had), had  # the case is there: some copies, not all
    for res in results:
        for summed in ("", " summed"):  # average=True, average=False
            for stage, copies in res["sync_grads" + summed].items():
                for g, g2 in zip(copies, res["two calls" + summed][stage]):
                    assert g.keys() == g2.keys() and "never" not in g, (stage, g.keys())
                    assert all(torch.equal(g[n], g2[n]) for n in g), (stage, summed)
        # summed over the 2 replicas: twice the average (exactly: a power of two)
        for stage, copies in res["sync_grads summed"].items():
            for g, g2 in zip(copies, res["sync_grads"][stage]):
                assert all(torch.equal(g[n], 2 * g2[n]) for n in g), stage
    for d in range(2):  # _summed: both copies of every stage bitwise equal
        got = _summed([r for r in results if r["replica"] == d], "sync_grads")
        assert any("extra" in g for g in got.values()), got.keys()


@pytest.mark.parametrize("name,pp,N", [("dualpipev", 2, 4), ("dualpipe", 2, 4)])
def test_fsdp2_sharded_stages_equal_the_full_batch(name, pp, N):
    """Stage modules fully_shard'ed over the data-parallel ranks (FSDP2): its
    reduce-scatter averages the replicas' gradients; clip_grad_norm_ sums the shards'
    contributions over the data-parallel mesh."""
    from tests.training_workers import fsdp_pp
    results = run_ranks(fsdp_pp, 2 * pp, name, N, timeout=300)
    stages, ref_losses = _reference(_num_stages(name, pp), N, [0, 1])
    norm = torch.nn.utils.clip_grad_norm_([q for st in stages for q in st.parameters()], 0.05)
    for res in results:
        if res["loss_slice"] is not None:
            a, b = res["loss_slice"]
            assert torch.equal(res["loss"], ref_losses[res["replica"]][a:b])
        torch.testing.assert_close(res["norm"], norm, rtol=1e-6, atol=0)
    for d in range(2):
        _compare_grads(_summed([r for r in results if r["replica"] == d]), stages)


def test_fsdp2_refuses_split_linear_and_runs_whole_backwards_for_weight_grad_store():
    from tests.compose_models import reference as compose_reference
    from tests.training_workers import fsdp_pp, fsdp_wgs
    refused = run_ranks(fsdp_pp, 4, "dualpipev", 4, True, timeout=300)
    for res in refused:
        assert res["error"].startswith("ValueError") and "FSDP" in res["error"], res
    results = run_ranks(fsdp_wgs, 4, 4, timeout=300)
    _, grads = compose_reference(4, 4, {"linear": "wgs"}, steps=2)  # batches 0 and 1
    for d in range(2):
        got = _summed([r for r in results if r["replica"] == d])
        for stage, ref in grads.items():
            for n, g in ref.items():
                d_ = cosine_distance(got[stage][n], g / 2)
                assert d_ < 1e-13, f"stage {stage} {n}: cosine distance {d_}"


def test_ddp_wrapped_stages_are_refused_saying_what_to_use():
    from tests.training_workers import ddp_stage_refused
    (msg,) = run_ranks(ddp_stage_refused, 1, timeout=120)
    assert msg.startswith("ValueError") and "DistributedDataParallel" in msg and \
        "all_reduce_grads" in msg, msg
