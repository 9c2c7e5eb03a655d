"""dualpipe.checkpoint: stage-keyed DCP checkpoints across layouts, against the
uninterrupted run (same layout: bit for bit) and the single-process model."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dualpipe import checkpoint
from tests.models import Stage, criterion, make_batch, microbatch_losses
from tests.mp import run_ranks
from tests.training_workers import checkpoint_round

N = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """DualPipe on 4 ranks (4 stages, each on two ranks): 2 steps, save, 2 more."""
    path = str(tmp_path_factory.mktemp("ckpt") / "step2")
    res = run_ranks(checkpoint_round, 4, "dualpipe", N, path, "save", timeout=240)
    weights = {}
    for r in res:
        for stage, w in r["saved"].items():
            if stage in weights:  # the two copies of a DualPipe stage are identical
                assert all(torch.equal(weights[stage][k], v) for k, v in w.items())
            weights[stage] = w
    losses = torch.zeros(2, N)
    for r in res:
        if r["loss_slice"] is not None:
            a, b = r["loss_slice"]
            for i, l in enumerate(r["losses"]):
                losses[i, a:b] = l
    return path, weights, losses


def _losses(res):
    out = torch.full((2, N), float("nan"))
    for r in res:
        if r["loss_slice"] is not None:
            a, b = r["loss_slice"]
            for i, l in enumerate(r["losses"]):
                out[i, a:b] = l
    assert not out.isnan().any()
    return out


def _check_weights(res, weights):
    seen = set()
    for r in res:
        for stage, w in r["loaded"].items():
            assert sorted(w) == sorted(weights[stage])
            for k, v in w.items():
                assert torch.equal(v, weights[stage][k]), f"stage {stage} {k} not restored"
            seen.add(stage)
    assert seen == set(weights)


def test_each_stage_is_saved_once(saved):
    path, weights, _ = saved
    md = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    model = sorted(k for k in md if k.startswith("model."))
    assert model == sorted(f"model.stage{s}.{n}" for s, w in weights.items() for n in w)
    optim = [k for k in md if k.startswith("optim.")]
    # Adam: step, exp_avg, exp_avg_sq and the group's hyper-parameters per parameter
    assert len(optim) == 4 * len(model)


def test_same_layout_continues_bit_identically(saved):
    path, weights, losses = saved
    res = run_ranks(checkpoint_round, 4, "dualpipe", N, path, "load", timeout=240)
    _check_weights(res, weights)
    assert all(lr == [0.01] for lr in (r["lr"] for r in res)), "hyper-parameters not restored"
    assert torch.equal(_losses(res), losses)


def test_dualpipev_on_two_ranks_loads_the_dualpipe_checkpoint(saved):
    path, weights, losses = saved
    res = run_ranks(checkpoint_round, 2, "dualpipev", N, path, "load", timeout=240)
    _check_weights(res, weights)
    got = _losses(res)
    # exact weights: the first step's losses are bitwise those of the uninterrupted run;
    # after one update they agree within rounding (the gradients are summed in another
    # order, so the updated weights differ in the last bits)
    assert torch.equal(got[0], losses[0])
    torch.testing.assert_close(got, losses, rtol=1e-5, atol=1e-7)


def test_the_single_process_model_loads_it_and_continues(saved):
    path, weights, losses = saved
    stages = [Stage(s + 50) for s in range(4)]
    opt = torch.optim.Adam([q for st in stages for q in st.parameters()], lr=0.5)
    checkpoint.load_stages(path, stages, opt)
    for s, st in enumerate(stages):
        for k, v in st.state_dict().items():
            assert torch.equal(v, weights[s][k])
    got = torch.zeros(2, N)
    for i, step in enumerate((2, 3)):
        (x,), (y,) = make_batch(step, N, False)
        got[i] = microbatch_losses(stages, x, y, N, criterion)
        opt.step()
        opt.zero_grad()
    assert torch.equal(got[0], losses[0])
    torch.testing.assert_close(got, losses, rtol=1e-5, atol=1e-7)


def test_another_stage_count_is_refused_on_every_rank(saved):
    path, _, _ = saved
    res = run_ranks(checkpoint_round, 2, "dualpipe", 4, path, "wrong", timeout=240)
    for r in res:
        assert r["error"].startswith("ValueError") and "4 stages" in r["error"] and \
            "has 2" in r["error"], r["error"]
        assert len(r["after"]) == 1  # the pipeline still trains
    with pytest.raises(ValueError, match="4 stages, 2 were given"):
        checkpoint.load_stages(path, [Stage(0), Stage(1)])
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.load_stages(path + "-missing", [Stage(0)])


def test_compiled_and_plain_stages_share_a_checkpoint(tmp_path):
    compiled = [torch.compile(Stage(s), backend="eager") for s in range(2)]
    assert any("_orig_mod." in k for k in compiled[0].state_dict())
    checkpoint.save_stages(tmp_path / "c", compiled)
    plain = [Stage(s + 50) for s in range(2)]
    checkpoint.load_stages(tmp_path / "c", plain)
    for c, p in zip(compiled, plain):
        assert all(torch.equal(a, b) for a, b in zip(c.state_dict().values(),
                                                     p.state_dict().values()))


def test_one_rank_rejecting_stops_every_rank_before_anything_is_read(saved):
    path, _, _ = saved
    res = run_ranks(checkpoint_round, 4, "dualpipe", N, path, "one_bad", timeout=240)
    assert "stage 1 does not match the checkpoint" in res[1]["error"], res[1]["error"]
    for r in (0, 2, 3):
        assert "pipeline rank(s) [1] rejected the checkpoint" in res[r]["error"], res[r]["error"]



def test_single_process_misuse_says_what_is_wrong(saved, tmp_path):
    path, _, _ = saved
    import torch.nn as nn
    bad = [Stage(s) for s in range(4)]
    bad[2].l2 = nn.Linear(8, 4)
    with pytest.raises(ValueError, match=r"stage 2 l2.weight: the checkpoint has shape \[8, 8\]"):
        checkpoint.load_stages(path, bad)
    bad[2].extra = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="stage 2 does not match.*unexpected|stage 2 does not match.*missing"):
        checkpoint.load_stages(path, bad)
    plain = tmp_path / "plain"
    checkpoint.save_stages(plain, [Stage(0), Stage(1)])  # no optimizer
    stages = [Stage(0), Stage(1)]
    opt = torch.optim.SGD([q for st in stages for q in st.parameters()], lr=0.1)
    with pytest.raises(ValueError, match="saved without an optimizer"):
        checkpoint.load_stages(plain, stages, opt)
    other = tmp_path / "other"
    with warnings.catch_warnings():  # DCP says it assumes one process: it does
        warnings.simplefilter("ignore")
        dcp.save({"w": torch.zeros(2)}, checkpoint_id=str(other), no_dist=True)
    with pytest.raises(ValueError, match="not a dualpipe checkpoint"):
        checkpoint.load_stages(other, stages)
    with pytest.raises(TypeError, match="stages must be"):
        checkpoint.load_stages(plain, Stage(0))


def test_fsdp2_sharded_stages_save_and_continue_bit_identically(tmp_path):
    from tests.training_workers import fsdp_checkpoint
    path = str(tmp_path / "fsdp")
    saved = run_ranks(fsdp_checkpoint, 4, path, "save", timeout=300)
    loaded = run_ranks(fsdp_checkpoint, 4, path, "load", timeout=300)
    for a, b in zip(saved, loaded):
        assert "FSDP2-sharded" in a["error"] and "process_group" in a["error"], a["error"]
        for x, y in zip(a["losses"], b["losses"]):
            assert (x is None and y is None) or torch.equal(x, y)
    assert any(a["losses"][0] is not None for a in saved)
