"""examples/moe_block.py: a MoE block with expert-parallel all-to-alls under DualPipe.

One run of the example on a 2 x 2 (pipeline x expert) gloo mesh, 4 micro-batches, tiny
sizes, one measured step per (order, delay): the overlapped order against the sequential
order (losses bitwise, gradients cosine < 1e-13), both against the single-process
reference, the recorded sub-stage order of every F&B pair, and, with the all-to-alls
delayed by 10 ms, communication hidden under compute in every pair (none in the
sequential order).  Plus in-process checks of the block and its error messages.
"""
import json

import pytest
import torch

from examples.moe_block import (COMBINE_EARLY_ORDER, ExpertGroup, MoEBlock, MoEConfig,
                                canonical_grads, criterion, draw_pair, draw_timeline,
                                emulate_all_to_all, main)
from overlap.fb import SUBSTAGE_COMM_LANE, SUBSTAGE_COMPUTE_LANE, overlapped_forward_backward

SIZES = ["--chunks", "4", "--batch", "2", "--seq", "8", "--dim", "16", "--heads", "2",
         "--ffn", "32", "--experts", "4", "--top-k", "2"]
DELAY = 10.0


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    out = tmp_path_factory.mktemp("moe")
    summary = main(SIZES + ["--steps", "1", "--delay-ms", "0", str(DELAY),
                            "--orders", "combine-early", "sequential", "--out", str(out),
                            "--no-draw", "--timeout", "120"])
    return summary, out


def _runs(summary, order, delay):
    return [(r, next(x for x in r["runs"] if x["order"] == order and x["delay_ms"] == delay))
            for r in summary["results"]]


def test_overlapped_equals_sequential_and_reference(example):
    summary, _ = example
    checks = summary["checks"]
    assert len(checks["vs_sequential"]) == 4 * 2  # 4 ranks x 2 delays
    for c in checks["vs_sequential"]:
        assert c["loss_bitwise"], c
        assert c["grad_cos_max"] < 1e-13, c
    assert len(checks["vs_reference"]) == 2 * 2
    for c in checks["vs_reference"]:
        assert c["loss_bitwise"], c  # same kernels on the same shapes as one process
        assert c["grad_cos_max"] < 1e-13, c
        assert not c["missing"], c
    assert summary["numerics_ok"]
    # every rank of the last stage of a stream returned its micro-batches' losses
    losses = [run["loss"] for r, run in _runs(summary, "combine-early", 0.0)]
    assert all(x is not None and x.shape == (2,) for x in losses)


def test_every_fb_pair_runs_the_combine_early_order(example):
    summary, _ = example
    pairs = 0
    for r, run in _runs(summary, "combine-early", DELAY):
        st = run["steps"][-1]
        for w in st["windows"]:
            labels = [lab for (a, b, lab, lane) in sorted(st["sub"])
                      if lane in (SUBSTAGE_COMPUTE_LANE, SUBSTAGE_COMM_LANE)
                      and w["start_s"] <= a <= w["end_s"]]
            assert labels == list(COMBINE_EARLY_ORDER), (r["pp_rank"], w["action"], labels)
            pairs += 1
    assert pairs == 4  # DualPipe, 2 pipeline ranks, 4 micro-batches: one F&B per rank


def test_delayed_all_to_alls_are_hidden_only_when_overlapped(example):
    summary, _ = example
    overlapping = 0
    for r, run in _runs(summary, "combine-early", DELAY):
        st = run["steps"][-1]
        for w in st["windows"]:
            sp = {lab: (a, b) for (a, b, lab, lane) in st["sub"]
                  if lane != "sub.fb" and w["start_s"] <= a <= w["end_s"]}
            # F:attn is issued while B:combine (>= 10 ms) is in flight: their overlap is
            # hidden communication (unless the host stalled for longer than the delay)
            both = min(sp["F:attn"][1], sp["B:combine"][1]) - sp["F:attn"][0]
            assert sp["F:attn"][0] >= sp["B:combine"][0]
            if both > 0:
                overlapping += 1
                assert w["hidden_s"] >= 0.99 * both, (r["pp_rank"], w)
            # B:combine, then F:dispatch with B:dispatch, then F:combine: >= 3 delays
            assert w["comm_s"] >= 3 * DELAY / 1e3 * 0.99, (r["pp_rank"], w)
    assert overlapping >= 3, overlapping  # of the 4 pairs (all 4 unless the host stalls)
    seq = [w for r, run in _runs(summary, "sequential", DELAY)
           for w in run["steps"][-1]["windows"]]
    # every communication is waited for before the next compute: ~nothing is hidden
    # (completion callbacks may be timed a little late)
    assert sum(w["hidden_s"] for w in seq) < 0.1 * sum(w["comm_s"] for w in seq)
    ov = next(s for s in summary["runs"] if s["order"] == "combine-early"
              and s["delay_ms"] == DELAY)
    assert ov["hidden_fraction"] > 0


def test_timeline_is_drawn_as_chrome_trace(example, tmp_path):
    summary, _ = example
    files = draw_timeline(summary["results"], "combine-early", DELAY, 0, 4,
                          str(tmp_path / "t"), formats=("json",))
    trace = json.loads(open(files[0]).read())
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e.get("name") for e in events}
    assert {"F:attn", "B:combine", "F:dispatch"} <= names, sorted(n for n in names if n)
    pair = json.loads(open(draw_pair(summary["results"], "combine-early", DELAY, 4,
                                     str(tmp_path / "pair.json"))).read())
    events = pair["traceEvents"] if isinstance(pair, dict) else pair
    assert [e["name"] for e in events if e.get("name") in COMBINE_EARLY_ORDER]


def test_summary_json_written(example):
    summary, out = example
    data = json.loads((out / "summary.json").read_text())
    assert data["numerics_ok"] is True
    assert {(s["order"], s["delay_ms"]) for s in data["runs"]} == {
        ("combine-early", 0.0), ("combine-early", DELAY), ("sequential", 0.0),
        ("sequential", DELAY)}


def test_no_pipeline_mode_overlaps_and_matches_the_reference(tmp_path):
    """--pp 1: every expert-parallel rank runs fb-only on a pipeline of one (issue 14
    section 3): losses bitwise and gradients as the sequential order and the
    single-process reference, the combine-early order in all N-1 F&B pairs, and the
    delayed all-to-alls partly hidden there, ~not at all in the sequential order."""
    n = 4
    summary = main(SIZES + ["--pp", "1", "--ep", "2", "--steps", "1", "--delay-ms", str(DELAY),
                            "--orders", "combine-early", "sequential", "--out",
                            str(tmp_path), "--no-draw", "--timeout", "120"])
    checks = summary["checks"]
    assert summary["numerics_ok"]
    assert len(checks["vs_sequential"]) == 2 and len(checks["vs_reference"]) == 2
    assert all(c["loss_bitwise"] and c["grad_cos_max"] < 1e-13 for c in
               checks["vs_sequential"] + checks["vs_reference"]), checks
    for r, run in _runs(summary, "combine-early", DELAY):
        assert run["loss"].shape == (n,)  # every micro-batch's loss on every rank
        st = run["steps"][-1]
        assert len(st["windows"]) == n - 1, st["windows"]
        for w in st["windows"]:
            labels = [lab for (a, b, lab, lane) in sorted(st["sub"])
                      if lane in (SUBSTAGE_COMPUTE_LANE, SUBSTAGE_COMM_LANE)
                      and w["start_s"] <= a <= w["end_s"]]
            assert labels == list(COMBINE_EARLY_ORDER), (r["ep_rank"], w["action"], labels)
    by = {(s["order"], s["delay_ms"]): s for s in summary["runs"]}
    # a pair hides at most its compute, a few ms here against >= 30 ms of delayed
    # all-to-alls: so the share of the communication hidden scales with this machine's
    # speed (10-20 % on an earlier, slower hour of this VM; 4.8-6.1 % on a faster one,
    # which failed a 5 % bound); what combine-early must hide is a good part of what it
    # can, the pairs' compute (60-75 % of it, measured on the faster hour); the
    # sequential order hides nothing
    ce = by[("combine-early", DELAY)]
    hideable = min(ce["comm_s"], ce["pairs"] * ce["mean_pair_compute_s"])
    assert ce["hidden_s"] > 0.3 * hideable, by
    seq = by[("sequential", DELAY)]
    assert seq["hidden_s"] < 0.1 * seq["comm_s"], seq
    with pytest.raises(SystemExit):
        main(["--pp", "1", "--chunks", "1"])


# -- in-process -------------------------------------------------------------------------
CFG = MoEConfig(dim=16, heads=2, seq=8, ffn=32, num_experts=4, top_k=2)


def test_single_process_block_overlapped_equals_plain():
    """Expert group of one rank with delayed (threaded) all-to-alls: the generated
    overlapped pair gives the same bits as a plain forward then backward."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(3)
    x0, x1, lab0 = (torch.randn(2, CFG.seq, CFG.dim, generator=g) for _ in range(3))
    gy = torch.randn(2, CFG.seq, CFG.dim, generator=g)
    ep = ExpertGroup(comm_delay_s=0.002)
    a0, a1, r0, r1 = (MoEBlock(CFG, s, ep) for s in (0, 1, 0, 1))
    i1 = x1.clone().requires_grad_(True)
    o1 = a1(i1)
    outs, loss0 = MoEBlock.overlapped_forward_backward(a0, [x0], criterion, [lab0], a1, None,
                                                       [o1], [gy])
    ri1 = x1.clone().requires_grad_(True)
    ro1 = r1(ri1)
    ro0 = r0(x0)
    rloss0 = criterion(ro0, lab0)
    ro1.backward(gy)
    assert torch.equal(outs[0], ro0) and torch.equal(loss0, rloss0)
    assert torch.equal(i1.grad, ri1.grad)
    ga, gr = canonical_grads(a1), canonical_grads(r1)
    assert ga.keys() == gr.keys() and all(torch.equal(ga[k], gr[k]) for k in ga)
    # and with the generic entry point and the sequential order: same again
    b1 = MoEBlock(CFG, 1, ep)
    j1 = x1.clone().requires_grad_(True)
    p1 = b1(j1)
    overlapped_forward_backward(MoEBlock(CFG, 0, ep), [x0], None, [], b1, None, [p1], [gy],
                                order="sequential")
    assert torch.equal(j1.grad, ri1.grad)


def test_routing_respects_capacity_and_gates():
    blk = MoEBlock(CFG, 0)
    h = torch.randn(2, CFG.seq, CFG.dim)
    send, tok = blk.route(h)
    t, c = 2 * CFG.seq, CFG.capacity(2 * CFG.seq)
    assert send.shape == (CFG.num_experts * c, CFG.dim + 1) and tok.shape == (CFG.num_experts * c,)
    used = tok < t
    # no token twice in one expert's slots; empty slots carry zero rows and zero gates
    for e in range(CFG.num_experts):
        ids = tok[e * c:(e + 1) * c]
        ids = ids[ids < t]
        assert len(set(ids.tolist())) == len(ids)
    assert torch.all(send[~used] == 0)
    assert int(used.sum()) <= t * CFG.top_k


def test_emulated_all_to_all_is_equal_split_exchange():
    a = torch.arange(8.).view(4, 2)
    b = 10 + torch.arange(8.).view(4, 2)
    ra, rb = emulate_all_to_all([a, b])
    assert torch.equal(ra, torch.cat([a[:2], b[:2]]))
    assert torch.equal(rb, torch.cat([a[2:], b[2:]]))


def test_user_errors_say_what_to_change():
    with pytest.raises(ValueError, match="multiple of heads"):
        MoEConfig(dim=10, heads=4)
    with pytest.raises(ValueError, match="top_k"):
        MoEConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="not in 0..1"):
        ExpertGroup(size=2, rank=2)
    with pytest.raises(ValueError, match="comm_delay_s"):
        ExpertGroup(comm_delay_s=-1)
    with pytest.raises(ValueError, match="divisible by the expert-parallel size"):
        MoEBlock(MoEConfig(num_experts=3), 0, ExpertGroup(size=2, rank=0))
    with pytest.raises(RuntimeError, match="emulate_all_to_all"):
        ExpertGroup(size=2, rank=1).all_to_all(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="divisible"):
        ExpertGroup(size=2, rank=0).all_to_all(torch.zeros(3, 2))
    with pytest.raises(SystemExit):
        main(["--pp", "3"])
