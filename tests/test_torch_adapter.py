"""overlap.adapters: our overlapped F&B as torch.distributed.pipelining's OVERLAP_F_B function.

Two gloo ranks run torch's ScheduleDualPipeV over four MoE stages (examples/moe_block.py,
expert group of one rank, all-to-alls delayed 5 ms so the interleaving has something to
hide) three times: torch's default path, with the adapter, and with the adapter on
modules it must run plainly.  Losses must be bitwise equal, gradients within a cosine
distance of 1e-13 (and both equal a single-process run), the adapter must have run the
pairs, and the interleaved pairs must show communication under compute.
"""
import pytest
import torch

from overlap.adapters import (TorchOverlapFB, register_overlapped_forward_backward,
                              torch_overlap_support)

SUPPORTED, WHY = torch_overlap_support()
needs_torch = pytest.mark.skipif(not SUPPORTED, reason=WHY or "supported")

CFG = dict(dim=16, heads=2, seq=8, ffn=32, num_experts=4, top_k=2, capacity_factor=1.25,
           seed=0)


def test_support_probe_gives_a_reason():
    ok, why = torch_overlap_support()
    assert isinstance(ok, bool)
    assert ok == (why == ""), why
    if not ok:
        assert torch.__version__ in why


@needs_torch
def test_user_errors_say_what_to_change():
    from torch.distributed.pipelining import schedules as S
    with pytest.raises(TypeError, match="ScheduleDualPipeV"):
        register_overlapped_forward_backward(object())
    with pytest.raises(TypeError, match="Timeline"):
        TorchOverlapFB(timeline="not a timeline")
    fn = TorchOverlapFB()
    ctx = S._PipelineContext(schedule_ref=None)
    with pytest.raises(ValueError, match="OVERLAP_F_B"):
        fn(S._Action(0, S.FORWARD, 0), ctx)


@needs_torch
def test_schedule_dualpipev_with_adapter_matches_default_path():
    from dualpipe.launch import run_ranks
    from examples.moe_block import MoEConfig
    from examples.torch_pipelining_adapter import compare, rank_main, reference

    n, batch = 4, 2
    opts = {"cfg": CFG, "chunks": n, "batch": batch, "delay_ms": 5.0,
            "modes": ["plain", "overlap", "fallback"]}
    results = run_ranks(rank_main, 2, opts, timeout=120)
    res = compare(results, reference(MoEConfig(**CFG), 4, n, batch))
    # the adapter ran every OVERLAP_F_B pair of both ranks, interleaved
    assert min(res["calls"]) > 0 and res["plain_pairs"] == [0, 0], res
    assert res["loss_bitwise"]
    assert res["grad_cos_max"] < 1e-13
    assert res["ref_loss_bitwise"]
    assert res["ref_grad_cos_max"] < 1e-13
    # modules without overlapped_forward_backward: torch's semantics, counted as plain
    assert res["fallback_calls"] == [0, 0] and min(res["fallback_plain_pairs"]) > 0
    assert "overlapped_forward_backward" in res["fallback_reason"]
    assert res["fallback_loss_bitwise"] and res["fallback_grad_bitwise"]
    # interleaved pairs: the 5 ms all-to-alls run while sub-stages compute
    ws = [w for r in results for w in r["overlap"]["windows"]]
    assert len(ws) == sum(res["calls"])
    assert sum(w["hidden_s"] for w in ws) > 0
    assert all(w["comm_s"] > 0 for w in ws)
