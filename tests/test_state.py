"""Model state: ``state_dict``/``load_state_dict`` of a pipeline round-trips, and
DualPipe's two copies of a stage stay bitwise identical under an optimizer when their
gradients are reduced with :func:`dualpipe.reduce_dualpipe_grads`.

Runs inside the shared rank session of :func:`tests.long_workers.run_session`
(DualPipe on 4 ranks, DualPipeV on 2; see ``test_long_run.py``)."""
from __future__ import annotations

import pytest
import torch

from tests import long_workers as lw


@pytest.mark.parametrize("name", list(lw.SESSIONS))
def test_state_dict_round_trip_continues_identically(name):
    """Train 3 steps, save model + optimizer state (torch.save bytes) on every rank,
    train 4 more; a fresh pipeline whose stages start from other weights loads the
    saved state and trains the same 4 steps: losses and final parameters bit-equal."""
    res = lw.session_part(name, "state")
    cfg = lw.SESSION_CFG
    for rank, r in enumerate(res):
        # the pipeline is an nn.Module holding this rank's two stage modules
        assert {k.split(".")[1] for k in r["keys"]} == {"0", "1"}, r["keys"]
        assert all(k.startswith("module.") for k in r["keys"])
        assert len(r["cont"]) == len(r["resumed"]) == cfg["state_after"]
        for st, (a, b) in enumerate(zip(r["cont"], r["resumed"])):
            assert (a is None) == (b is None), (rank, st)
            if a is not None:
                assert torch.equal(a, b), \
                    f"{name} rank {rank} step {cfg['state_before'] + st}: {a} != {b}"
        assert sorted(r["final"]) == sorted(r["final2"]) == r["keys"]
        for k in r["keys"]:
            assert torch.equal(r["final"][k], r["final2"][k]), f"{name} rank {rank} {k}"
    assert any(r["cont"][0] is not None for r in res)  # some rank computes losses


def test_dualpipe_copies_stay_identical_with_reduced_grads():
    """After 5 SGD(momentum) steps with reduce_dualpipe_grads, every rank swaps
    parameters with its partner (rank P-1-r, over the user's process group) and finds
    both copies of each of its stages bitwise equal."""
    res = lw.session_part("dualpipe", "copies")
    world = len(res)
    stages = set()
    for rank, r in enumerate(res):
        for c in (0, 1):
            assert r[c]["equal"] and r[c]["maxdiff"] == 0.0, (rank, c, r[c])
            stages.add(r[c]["stage"])
        # chunk 0 is stage r of the forward direction, chunk 1 stage P-1-r of the reverse
        assert (r[0]["stage"], r[1]["stage"]) == (rank, world - 1 - rank)
    assert stages == set(range(world))


def test_dualpipe_copies_diverge_without_reduction():
    """The control: without the reduction each copy follows its own direction's
    gradient and the copies part after the first optimizer step."""
    res = lw.session_part("dualpipe", "copies_unreduced")
    for rank, r in enumerate(res):
        for c in (0, 1):
            assert not r[c]["equal"] and r[c]["maxdiff"] > 1e-3, (rank, c, r[c])
