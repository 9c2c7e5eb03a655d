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
