"""What a training job puts inside a stage, through the real runtime on gloo, against
the single-process run of the same micro-batches: activation checkpointing (plain and
selective) with deferred weight gradients (split_linear_weight_grads and a custom
WeightGradStore function), bf16 autocast and bf16 parameters, torch.compile'd stages.

Losses are bitwise equal to the reference wherever the forward is the same code (all
eager cases); gradients within a cosine distance of 1e-13 (float32) or of bf16 rounding."""
from __future__ import annotations

import pytest
import torch

from tests.compose_models import reference, run_cases
from tests.models import cosine_distance, sum_stage_grads
from tests.mp import run_ranks


def _stages(name, world):
    return 2 * world if name == "dualpipev" else world


def check(name: str, world: int, N: int, cases: list[dict], exact_losses=True, grad_tol=1e-13):
    cases = [dict(c, schedule=name, chunks=N) for c in cases]
    results = run_ranks(run_cases, world, cases, timeout=420)
    for ci, case in enumerate(cases):
        ref_losses, ref_grads = reference(_stages(name, world), N, case, case.get("steps", 1))
        seen = 0
        for per_rank in results:
            res = per_rank[ci]
            if res["loss_slice"] is None:
                continue
            a, b = res["loss_slice"]
            for st, got in enumerate(res["losses"]):
                want = ref_losses[st][a:b]
                if exact_losses:
                    assert torch.equal(got, want), f"{case}: losses {got} != {want}"
                else:
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
                seen += b - a
        assert seen == N * case.get("steps", 1), case
        defers = case.get("split") or case.get("linear") == "wgs"
        if defers and name != "1f1b" and not case.get("fsdp"):
            # the W passes really ran the weight gradients (a compiled or checkpointed
            # stage must not quietly compute them in the input-gradient pass)
            assert all(per_rank[ci]["deferred"] > 0 for per_rank in results), \
                (case, [per_rank[ci]["deferred"] for per_rank in results])
        total = sum_stage_grads(per_rank[ci]["grads"] for per_rank in results)
        assert sorted(total) == sorted(ref_grads)
        for stage, ref in ref_grads.items():
            assert sorted(total[stage]) == sorted(ref), f"{case}: stage {stage} params"
            for n, r in ref.items():
                d = cosine_distance(total[stage][n].double(), r.double())
                assert d < grad_tol, f"{case}: stage {stage} {n}: cosine distance {d}"


CKPT = [dict(body=b, linear=lin, split=split)
        for b in ("ckpt", "sac")
        for lin, split in (("nn", True), ("wgs", False))]


@pytest.mark.parametrize("name,world,N", [("dualpipev", 2, 4), ("dualpipe", 2, 4),
                                          ("zb1p", 2, 4)])
def test_activation_checkpointing_with_deferred_weight_grads(name, world, N):
    check(name, world, N, CKPT + [dict(linear="wgs", steps=2)])


def test_bf16_autocast_and_bf16_parameters():
    # autocast: the same bf16 kernels on both sides, float32 master weights
    check("dualpipev", 2, 4, [dict(autocast=True), dict(autocast=True, body="ckpt", split=True)])
    # bf16 parameters: DualPipeV runs every stage's micro-batches in order, as the
    # reference does, so even the bf16 gradient sums agree
    check("dualpipev", 2, 4, [dict(dtype="bf16"), dict(dtype="bf16", split=True)],
          grad_tol=1e-5)


def test_compiled_stages():
    """torch.compile'd stages (torch's own ScheduleDualPipeV refuses them): plain, with
    split_linear_weight_grads, with a WeightGradStore function.  aot_eager runs the eager
    kernels through dynamo and AOTAutograd, so the losses stay bitwise equal."""
    check("dualpipev", 2, 4, [dict(compile="aot_eager"), dict(compile="aot_eager", split=True),
                              dict(compile="aot_eager", linear="wgs")])
    for name in ("dualpipe", "zb1p", "1f1b"):
        check(name, 2, 4, [dict(compile="aot_eager", split=True)])


@pytest.mark.slow
def test_compiled_stages_inductor():
    """Inductor generates its own kernels: numerics within rounding of eager."""
    check("dualpipe", 2, 4, [dict(compile="inductor"), dict(compile="inductor", split=True)],
          exact_losses=False, grad_tol=1e-10)
