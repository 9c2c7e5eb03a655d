"""plan --comm-sms: the communication SM budget priced from a bench.overlap_gpu file.

The files here are written by the tests in the benchmark's own format (the fields
``bench/overlap_gpu.py`` writes); the GPU side (the measurement itself) is not exercised
by these tests: see docs/performance.md §9.
"""
from __future__ import annotations

import json

import pytest

from dualpipe import comm_budget as cb
from dualpipe import plan as planmod
from dualpipe.__main__ import main
from dualpipe.plan import BlockCosts, plan
from dualpipe.simulate import simulate

MIB = 2**20
BLOCK = BlockCosts(f=1.0e-3, b=2.0e-3, w=1.0e-3, act_bytes=1000, param_bytes=5000,
                   boundary_bytes=4096, micro_batch=4)


def _row(comm_sms, t_comp, t_comm, t_both, total=132, partition="software",
         compute="persistent", comm="nccl_a2a", compute_sms=None):
    return {"partition": partition, "compute": compute, "comm": comm, "comm_sms": comm_sms,
            "compute_sms": total - comm_sms if compute_sms is None else compute_sms,
            "t_comp_ms": t_comp, "t_comm_ms": t_comm,
            "t_both_ms": t_both,
            "comm_gbps": 64 * MIB / (t_comm / 1e3) / 1e9 if t_comm else 1.0}


# a persistent GEMM (its grid is the compute SMs, as bench.overlap_gpu sizes it): compute
# slows as SMs go to communication, communication speeds up, the overlap varies
ROWS = [_row(8, 1.00, 4.0, 4.6), _row(16, 1.05, 2.0, 2.1), _row(24, 1.20, 1.5, 1.9),
        _row(32, 1.40, 1.2, 1.8)]


def _file(tmp_path, rows=ROWS, **extra):
    d = {"benchmark": "overlap_gpu", "machine": {"gpu": "NVIDIA H200"},
         "config": {"comm_mib": 64}, "rows": rows, **extra}
    p = tmp_path / "overlap_gpu.json"
    p.write_text(json.dumps(d))
    return p


def test_points_are_read_as_the_module_says(tmp_path):
    c = cb.load_comm_budget(_file(tmp_path), 8 * MIB, 4)
    assert [p.comm_sms for p in c.points] == [8, 16, 24, 32]
    assert [p.compute_sms for p in c.points] == [124, 116, 108, 100]
    assert [round(p.compute_factor, 6) for p in c.points] == [1.0, 1.05, 1.2, 1.4]
    assert c.points[1].comm_bandwidth == pytest.approx(64 * MIB / 2.0e-3)
    # (T_comp + T_comm - T_both) / min(T_comp, T_comm)
    assert c.points[0].overlap_efficiency == pytest.approx(0.4)
    assert c.points[1].overlap_efficiency == pytest.approx((1.05 + 2.0 - 2.1) / 1.05)
    assert c.points[2].overlap_efficiency == pytest.approx((1.2 + 1.5 - 1.9) / 1.2)
    # not one of DEFAULT_KERNELS: the triple with the most rows
    assert c.kernels == "software/persistent/nccl_a2a" and "NVIDIA H200" in c.source
    assert c.warnings == () and "not capped by a link" in c.describe()


def test_cublas_on_a_software_split_keeps_every_sm_so_its_factor_is_one(tmp_path):
    """bench.overlap_gpu gives cuBLAS every SM on a software split (compute_sms = total
    on every row): its T_comp differs only by noise, which must not pick the budget;
    the interference is in T_both (the overlap efficiency).  Budget 0 (no split) prints
    as "default"."""
    rows = [_row(k, t, 2.0, 2.5, compute="cublas", compute_sms=132)
            for k, t in ((0, 1.02), (8, 1.00), (16, 1.07))]
    c = cb.load_comm_budget(_file(tmp_path, rows, finished=False), MIB, 4)
    assert c.kernels == "software/cublas/nccl_a2a"
    assert [p.compute_factor for p in c.points] == [1.0, 1.0, 1.0]
    assert c.points[0].label() == "default" and cb.budget_label(16) == "16"
    text = c.describe()
    assert "   default" in text and "did not finish" in text


def test_link_bandwidth_caps_the_measured_one(tmp_path):
    c = cb.load_comm_budget(_file(tmp_path), 8 * MIB, 4, link_bandwidth=10e9)
    slow = c.points[0]  # 64 MiB in 4 ms: 16.8 GB/s, capped at 10
    assert c.bandwidth(slow) == 10e9
    assert c.costs_at(BLOCK, slow).f == pytest.approx(BLOCK.f + 8 * MIB / 10e9 / 2)
    assert "capped at --comm-bandwidth 10 GB/s" in c.describe()
    with pytest.raises(ValueError, match="--comm-bandwidth must be > 0"):
        cb.load_comm_budget(_file(tmp_path), MIB, 4, link_bandwidth=0)


def test_measured_micro_batch_sizes_scale_the_bytes_once(tmp_path):
    """plan(costs_at=...) hands a block measured at m samples: its communication is
    comm_bytes x m / comm.micro_batch, nothing more."""
    comm = cb.load_comm_budget(_file(tmp_path), 8 * MIB, 4)
    at8 = BlockCosts(**{**BLOCK.to_json(), "micro_batch": 8, "bandwidth": 1e12})
    p = plan(BLOCK, devices=2, layers=4, global_batch=16, comm=comm, schedules=["1f1b"],
             costs_at=lambda m: at8 if m == 8 else
             BlockCosts(**{**BLOCK.to_json(), "micro_batch": m, "bandwidth": 1e12}))
    c = next(c for c in p.candidates if c.priced and c.micro_batch == 8 and c.ranks == 1)
    pt = next(q for q in comm.points if q.comm_sms == c.comm_sms)
    d = 16 * MIB / pt.comm_bandwidth  # twice the bytes of 4 samples
    want = planmod.stage_costs(at8, c.layers_per_stage, 8)
    assert c.costs.f == pytest.approx((want.f - at8.overhead) * pt.compute_factor
                                      + d / 2 * c.layers_per_stage + at8.overhead)


def test_costs_at_a_budget():
    p = cb.BudgetPoint(16, 116, 1.25, 1e9, 0.5)
    c = cb.CommBudget((p,), comm_bytes=2e6, micro_batch=4, kernels="k", source="s")
    at = c.costs_at(BLOCK, p)
    d = 2e6 / 1e9  # 2 ms of communication per forward + backward
    assert at.f == pytest.approx(1.25e-3 + d / 2) and at.b == pytest.approx(2.5e-3 + d / 2)
    assert at.w == pytest.approx(1.25e-3)
    pair = 3e-3 * 1.25
    assert at.fb == pytest.approx(pair + d - 0.5 * min(pair, d))
    # a block at twice the micro-batch moves twice the bytes
    big = c.costs_at(BlockCosts(**{**BLOCK.to_json(), "micro_batch": 8, "bandwidth": 1.0}), p)
    assert big.f == pytest.approx(1.25e-3 + 2 * d / 2)


def test_each_candidate_keeps_the_budget_that_gives_it_the_shortest_step(tmp_path):
    """Brute force: the kept budget is the minimum over the measured points of the
    simulated step, and the recommendation is the cheapest feasible (schedule, budget)."""
    comm = cb.load_comm_budget(_file(tmp_path), 64 * MIB, 4)
    p = plan(BLOCK, devices=4, layers=8, global_batch=16, comm=comm,
             schedules=["1f1b", "dualpipev", "zb1p"])
    priced = [c for c in p.candidates if c.priced]
    assert priced and all(c.comm_sms in {8, 16, 24, 32} for c in priced)
    for c in priced:
        s = planmod.get_schedule(c.schedule, c.ranks, c.chunks)
        times = {}
        for pt in comm.points:
            costs = planmod.stage_costs(comm.costs_at(BLOCK, pt), c.layers_per_stage,
                                        c.micro_batch)
            times[pt.comm_sms] = simulate(s, costs).makespan
        assert c.step_time == pytest.approx(min(times.values()), rel=1e-12)
        assert times[c.comm_sms] == pytest.approx(c.step_time, rel=1e-12)
    # 1F1B hides nothing: per block it pays compute x factor + all the communication,
    # least at 24 SMs (3.6 + 1.5 ms); DualPipeV's F&B pairs overlap best at 16 SMs
    one = {c.label(): c.comm_sms for c in priced if c.schedule == "1f1b"}
    assert set(one.values()) == {24}, one
    assert any(c.comm_sms == 16 for c in priced if c.schedule == "dualpipev")
    assert p.recommendation is min(priced, key=planmod._rank_key)
    d = p.to_json()
    assert d["comm_budget"]["kernels"] == "software/persistent/nccl_a2a"
    json.dumps(d)  # serialisable
    assert any("communication SM budget" in a for a in d["assumptions"])


def test_no_communication_keeps_the_fastest_compute(tmp_path):
    comm = cb.load_comm_budget(_file(tmp_path), 0, 4)
    p = plan(BLOCK, devices=2, layers=4, global_batch=8, comm=comm)
    assert {c.comm_sms for c in p.candidates if c.priced} == {8}


@pytest.mark.parametrize("content,match", [
    ({"rows": []}, "not a bench.overlap_gpu measurement"),
    ({"benchmark": "overlap_gpu", "rows": []}, "no measured rows"),
    ({"benchmark": "overlap_gpu", "rows": [_row(8, 1.0, 0.0, 1.0)]}, "must be > 0 ms"),
    ({"benchmark": "overlap_gpu", "rows": [{**_row(8, 1.0, 1.0, 1.5), "t_comp_ms": "x"}]},
     "'t_comp_ms' must be a finite number"),
    ({"benchmark": "overlap_gpu", "rows": [{k: v for k, v in _row(8, 1, 1, 1.5).items()
                                            if k != "comm_gbps"}]},
     "cannot tell the communication bandwidth"),
])
def test_bad_files_say_what_to_change(tmp_path, content, match):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=match):
        cb.load_comm_budget(p, MIB, 4)


def test_kernel_choice(tmp_path):
    rows = ROWS + [_row(20, 1.1, 1.0, 1.6, partition="green_ctx")]
    f = _file(tmp_path, rows)
    assert cb.load_comm_budget(f, MIB, 4, "green_ctx/persistent/nccl_a2a").points[0].comm_sms \
        == 20
    with pytest.raises(ValueError, match="holds: green_ctx/persistent/nccl_a2a, software/"):
        cb.load_comm_budget(f, MIB, 4, "software/persistent/sm_copy")
    with pytest.raises(ValueError, match="--comm-bytes must be"):
        cb.load_comm_budget(f, -1, 4)
    with pytest.raises(ValueError, match="is not valid JSON"):
        (tmp_path / "x.json").write_text("{")
        cb.load_comm_budget(tmp_path / "x.json", MIB, 4)
    with pytest.raises(ValueError, match="cannot read --comm-sms"):
        cb.load_comm_budget(tmp_path / "missing.json", MIB, 4)
    with pytest.raises(ValueError, match="at least one measured point"):
        cb.CommBudget((), MIB, 4, "k", "s")


def test_cli(tmp_path, capsys):
    costs = tmp_path / "costs.json"
    costs.write_text(json.dumps(BLOCK.to_json()))
    f = _file(tmp_path)
    base = ["plan", "--costs", str(costs), "--devices", "4", "--layers", "8",
            "--global-batch", "16"]
    assert main(base + ["--comm-sms", str(f), "--comm-bytes", "8MiB"]) == 0
    out = capsys.readouterr().out
    assert "comm SMs" in out and "communication SM budget: 4 point(s)" in out
    assert "communication SM budget 16 (software/persistent/nccl_a2a)" in out
    for bad, says in ([["--comm-sms", str(f)], "go together"],
                      [["--comm-bytes", "1MiB"], "go together"],
                      [["--comm-kernels", "a/b/c"], "pass that file too"],
                      [["--comm-bandwidth", "1e9"], "pass that file too"],
                      [["--comm-sms", str(f), "--comm-bytes", "1MiB", "--verify"],
                       "use one or the other"]):
        with pytest.raises(SystemExit) as e:
            main(base + bad)
        assert e.value.code == 2 and says in capsys.readouterr().err
    assert main(base + ["--comm-sms", str(f), "--comm-bytes", "1MiB", "--comm-kernels",
                        "x/y/z"]) == 2
    assert "--comm-kernels 'x/y/z' is not in" in capsys.readouterr().err
