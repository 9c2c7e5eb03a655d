"""``dualpipe.plan`` and ``python -m dualpipe plan``.

* profiling: calibrated sleep layers (``bench.stages``) measure their nominal F, B and W;
  the saved-activation, parameter and boundary bytes of small blocks match bytes counted
  by hand;
* enumeration: on small cases the planner's candidates, memory verdicts and
  recommendation agree with a brute force that calls the schedule generators and the
  simulator directly;
* the command line: ``--json``, an impossible cap (exit 1), bad cost files (exit 2 naming
  the field), ``-o`` traces, and the flag this version does not have;
* ``--verify``: per-sample sleep blocks (``tests/plan_stages.py``) run through the runtime
  on local ranks, measured / predicted within a loose sanity band (a functional check).
"""
import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys

from dataclasses import replace

import pytest
import torch
import torch.nn as nn

from dualpipe import plan as planmod
from dualpipe.__main__ import main
from dualpipe.plan import FEASIBLE, INVALID, OVER_MEMORY, BlockCosts, parse_bytes, plan
from dualpipe.schedules import get_schedule
from dualpipe.simulate import Costs, simulate

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCK = BlockCosts(f=1.0e-3, b=2.3e-3, w=0.9e-3, act_bytes=1000, param_bytes=5000,
                   boundary_bytes=400, micro_batch=2, latency=1e-5, bandwidth=1e8)
SMALL = dict(devices=4, layers=8, global_batch=16)
SMALL_SCHEDULES = ["dualpipe", "dualpipev", "1f1b", "zb1p"]


# --------------------------------------------------------------------------- profiling


def test_profile_sleep_layer_measures_nominal_costs():
    from bench.stages import calibrate_host_sleep, sleep_layer_class
    F, B, W = 0.040, 0.080, 0.040  # long enough that wake-up noise on a loaded VM is < 5 %
    calibrate_host_sleep()
    layer = sleep_layer_class()(4, F, B, W)
    # the median of 7: a VM's late wake-ups (seen: 2-13 ms on one sleep) are outvoted
    prof = planmod.profile_stage(lambda: (layer, torch.randn(3, 4), None), repeats=7,
                                 warmup=1)
    c = prof.costs
    assert c.f == pytest.approx(F, rel=0.05)
    assert c.b == pytest.approx(B, rel=0.05)
    # W is the deferred closure the runtime's W action runs; I the rest of the backward
    assert c.w == pytest.approx(W, rel=0.05)
    assert prof.i == pytest.approx(B - W, rel=0.05)
    assert c.micro_batch == 3 and c.fb is None
    assert prof.linear_layers == 0
    assert any("own WeightGradStore-aware" in n for n in prof.notes), prof.notes


def test_profile_bytes_of_a_linear_block():
    lin = nn.Linear(8, 4)
    x = torch.randn(3, 8)
    prof = planmod.profile_stage(lambda: (lin, x, None), repeats=1, warmup=0)
    c = prof.costs
    # parameters: 4x8 weight + 4 bias, float32
    assert c.param_bytes == (4 * 8 + 4) * 4
    # saved for backward: the input (the weight is saved too, but it is a parameter)
    assert c.act_bytes == 3 * 8 * 4
    # output: 3 x 4 float32
    assert c.boundary_bytes == 3 * 4 * 4
    assert prof.linear_layers == 1 and c.w > 0


def test_profile_bytes_count_each_storage_once():
    # Linear(8,16) saves its input x; ReLU saves its output r; Linear(16,4) saves its
    # input, which is r again: x + r, not x + 2r
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    prof = planmod.profile_stage(lambda: (block, torch.randn(5, 8), None), repeats=1,
                                 warmup=0)
    assert prof.costs.act_bytes == 5 * 8 * 4 + 5 * 16 * 4
    assert prof.costs.param_bytes == ((16 * 8 + 16) + (4 * 16 + 4)) * 4
    assert prof.linear_layers == 2


def test_profile_no_linear_gives_w_zero_with_a_note():
    norm = nn.LayerNorm(6)
    prof = planmod.profile_stage(lambda: (norm, torch.randn(2, 6), None), repeats=1,
                                 warmup=0)
    assert prof.costs.w == 0.0 and prof.costs.b > 0
    assert any("W = 0" in n for n in prof.notes), prof.notes


def test_profile_criterion_drives_the_backward():
    lin = nn.Linear(4, 2)
    calls = []

    def crit(out):
        calls.append(out.shape)
        return out.square().sum()
    planmod.profile_stage(lambda: (lin, torch.randn(3, 4), crit), repeats=2, warmup=1)
    # the bytes pass, F/B rounds and I/W rounds each call it once per round
    assert len(calls) == 1 + 3 + 3 and calls[0] == (3, 2)
    assert lin.weight.grad is not None


def test_example_stage_factory():
    from examples.plan_stage import make_block
    prof = planmod.profile_stage(lambda: make_block(dim=16, batch=2, seq=4), repeats=1,
                                 warmup=0)
    d = 16
    assert prof.costs.param_bytes == (2 * d + (4 * d * d + 4 * d) + (d * 4 * d + d)) * 4
    assert prof.costs.boundary_bytes == 2 * 4 * d * 4
    assert prof.costs.micro_batch == 2 and prof.linear_layers == 2


# --------------------------------------------------------------------------- cost files


@pytest.mark.parametrize("change, field", [
    ({"f": -1.0}, "'f'"),
    ({"w": 5.0}, "'w'"),
    ({"act_bytes": 1.5}, "'act_bytes'"),
    ({"micro_batch": 0}, "'micro_batch'"),
    ({"bandwidth": 0}, "'bandwidth'"),
    ({"fb": -2.0}, "'fb'"),
    ({"latency": "fast"}, "'latency'"),
    ({"typo": 1}, "'typo'"),
])
def test_cost_model_validation_names_the_field(change, field):
    d = {**BLOCK.to_json(), **change}
    with pytest.raises(ValueError, match=field):
        BlockCosts.from_json(d)


def test_cost_model_missing_field():
    d = BLOCK.to_json()
    del d["boundary_bytes"]
    with pytest.raises(ValueError, match="missing field.*'boundary_bytes'"):
        BlockCosts.from_json(d)


def test_cost_model_round_trip_and_infinite_bandwidth():
    assert BlockCosts.from_json(json.loads(json.dumps(BLOCK.to_json()))) == BLOCK
    inf = BlockCosts.from_json({k: v for k, v in BLOCK.to_json().items()
                                if k not in ("bandwidth", "latency", "fb")})
    assert math.isinf(inf.bandwidth) and inf.latency == 0 and inf.fb is None
    assert inf.to_json()["bandwidth"] is None


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1.5 MiB") == 3 * 2**19
    assert parse_bytes("4096") == 4096
    with pytest.raises(ValueError, match="8GiB"):
        parse_bytes("8 gigs")


# --------------------------------------------------------------------------- enumeration


def _brute_force(block, devices, layers, global_batch, names, cap, param_factor=4.0):
    """Every (schedule, P, N) priced straight from the generators and the simulator:
    {(name, P, N): (step time, memory)} for the valid ones."""
    out = {}
    for name in names:
        for P in (1, 2, 4):
            DP = devices // P
            per = global_batch // DP
            for N in range(1, per + 1):
                if per % N:
                    continue
                try:
                    s = get_schedule(name, P, N)
                except ValueError:
                    continue
                if layers % s.num_stages:
                    continue
                k = layers // s.num_stages
                scale = (per // N) / block.micro_batch
                c = Costs(f=k * block.f * scale, b=k * block.b * scale, w=k * block.w * scale,
                          latency=block.latency + block.boundary_bytes * scale / block.bandwidth)
                res = simulate(s, c)
                mem = (max(res.peak_activations) * k * block.act_bytes * scale
                       + len(s.placement[0]) * k * block.param_bytes * param_factor)
                out[(name, P, N)] = (res.makespan, mem)
    return out


def test_recommendation_is_the_brute_force_minimum():
    truth = _brute_force(BLOCK, **SMALL, names=SMALL_SCHEDULES, cap=None)
    mems = sorted(m for _t, m in truth.values())
    cap = int(mems[len(mems) // 2])  # about half the candidates fit
    p = plan(BLOCK, **SMALL, memory_cap=cap, schedules=SMALL_SCHEDULES)
    priced = {(c.schedule, c.ranks, c.chunks): c for c in p.candidates if c.priced}
    assert set(priced) == set(truth)
    for key, (t, mem) in truth.items():
        c = priced[key]
        assert c.step_time == pytest.approx(t, rel=1e-12)
        assert c.memory == math.ceil(mem) or c.memory == pytest.approx(mem, abs=1)
        assert c.status == (FEASIBLE if c.memory <= cap else OVER_MEMORY), key
        if c.status == OVER_MEMORY:
            assert c.memory > cap and "over the cap" in c.reason
    feasible = {k: v for k, v in truth.items() if v[1] <= cap}
    assert 0 < len(feasible) < len(truth)  # the cap really cuts
    best_t = min(t for t, _m in feasible.values())
    rec = p.recommendation
    assert rec.step_time == pytest.approx(best_t, rel=1e-9)
    # tie-break: the lowest memory among the candidates as fast as the best
    ties = [m for t, m in feasible.values() if t == pytest.approx(best_t, rel=1e-9)]
    assert rec.memory == pytest.approx(min(ties), abs=1)
    # without the cap the fastest candidate overall wins, and it is one the cap cut
    free = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES).recommendation
    assert free.step_time == pytest.approx(min(t for t, _m in truth.values()), rel=1e-9)
    assert free.step_time < rec.step_time


def test_every_combination_is_accounted_for():
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES)
    for c in p.candidates:
        assert (c.status == INVALID) == (not c.priced)
        if c.status == INVALID:
            assert c.reason and c.rejected_by in ("schedule", "batch", "layers")
    # DualPipe cannot run on one rank; 1F1B on 4 ranks cannot take 2 micro-batches
    assert any(c.schedule == "dualpipe" and c.ranks == 1 and c.rejected_by == "schedule"
               for c in p.candidates)
    one = [c for c in p.candidates if (c.schedule, c.ranks, c.chunks) == ("1f1b", 4, 2)]
    assert len(one) == 1 and "num_chunks" in one[0].reason


def test_layers_that_do_not_split_are_rejected_with_the_reason():
    # DualPipeV on 4 ranks has 8 stages: 12 layers do not split, 1F1B's 4 stages do
    p = plan(BLOCK, devices=4, layers=12, global_batch=16, schedules=["dualpipev", "1f1b"])
    dv4 = [c for c in p.candidates if (c.schedule, c.ranks) == ("dualpipev", 4)]
    assert len(dv4) == 1 and dv4[0].reason == "12 layers do not split into 8 stages"
    assert any(c.schedule == "1f1b" and c.ranks == 4 and c.priced for c in p.candidates)


def test_memory_cap_between_two_candidates():
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES)
    mems = sorted({c.memory for c in p.candidates if c.priced})
    assert len(mems) >= 3
    for lo, hi in zip(mems, mems[1:]):
        cap = (lo + hi) // 2
        q = plan(BLOCK, **SMALL, memory_cap=cap, schedules=SMALL_SCHEDULES)
        for c in q.candidates:
            if c.priced:
                assert c.status == (OVER_MEMORY if c.memory >= hi else FEASIBLE)
        assert q.recommendation.memory <= lo


def test_dualpipe_holds_twice_the_parameters_of_1f1b():
    p = plan(BLOCK, **SMALL, schedules=["dualpipe", "1f1b"], param_factor=3.0)
    for P in (2, 4):
        dp = next(c for c in p.candidates if c.priced and (c.schedule, c.ranks) == ("dualpipe", P))
        ob = next(c for c in p.candidates if c.priced and (c.schedule, c.ranks) == ("1f1b", P))
        k = SMALL["layers"] // P
        assert ob.param_memory == BLOCK.param_bytes * k * 3
        assert dp.param_memory == 2 * ob.param_memory


def test_linear_scaling_with_micro_batch_size():
    p = plan(BLOCK, devices=2, layers=4, global_batch=32, schedules=["1f1b"])
    # 1f1b P=2 DP=1: N=4 -> 8 samples per micro-batch, 4x the measured 2
    c = next(c for c in p.candidates if (c.ranks, c.chunks) == (2, 4))
    assert c.micro_batch == 8 and c.layers_per_stage == 2
    assert c.costs.f == pytest.approx(2 * BLOCK.f * 4)
    assert c.costs.latency == pytest.approx(BLOCK.latency + 400 * 4 / 1e8)


def test_no_feasible_candidate_says_what_to_relax():
    p = plan(BLOCK, **SMALL, memory_cap=10)
    assert p.recommendation is None and "--memory-cap" in p.why_none()
    q = plan(BLOCK, devices=4, layers=7, global_batch=16, schedules=["dualpipe"])
    assert q.recommendation is None and "--layers" in q.why_none()


def test_many_candidates_are_priced():
    """A sweep of over a hundred priced candidates (its time is a measurement, not an
    assert: docs/performance.md §9 gives it)."""
    p = plan(BLOCK, devices=16, layers=64, global_batch=1024)
    priced = [c for c in p.candidates if c.priced]
    assert len(priced) >= 100
    assert p.recommendation is not None and p.recommendation.priced


# --------------------------------------------------------------------------- command line


@pytest.fixture
def costs_file(tmp_path):
    path = tmp_path / "costs.json"
    path.write_text(json.dumps(BLOCK.to_json()))
    return path


def _args(costs_file, *extra):
    return ["plan", "--costs", str(costs_file), "--devices", "4", "--layers", "8",
            "--global-batch", "16", *extra]


def test_cli_json_subprocess(costs_file):
    p = subprocess.run([sys.executable, "-m", "dualpipe", *_args(costs_file, "--json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert d["cost_model"] == BLOCK.to_json()
    rec = d["recommendation"]
    best = min((c for c in d["candidates"] if c["status"] == FEASIBLE),
               key=lambda c: c["step_time"])
    assert rec["step_time"] == pytest.approx(best["step_time"])
    assert {c["schedule"] for c in d["candidates"]} >= set(SMALL_SCHEDULES) | {"fb-only"}


def test_cli_table(costs_file, capsys):
    assert main(_args(costs_file, "--memory-cap", "1MiB")) == 0
    out = capsys.readouterr().out
    assert "recommendation:" in out and "schedule" in out and "not priced:" in out


def test_cli_impossible_cap_exits_1(costs_file, capsys):
    assert main(_args(costs_file, "--memory-cap", "100")) == 1
    err = capsys.readouterr().err
    assert "nothing feasible" in err and "--memory-cap" in err


@pytest.mark.parametrize("bad, field", [({"w": 1.0, "b": 0.5}, "'w'"),
                                        ({"f": -0.1}, "'f'")])
def test_cli_bad_costs_file(tmp_path, capsys, bad, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**BLOCK.to_json(), **bad}))
    assert main(_args(path)) == 2
    assert field in capsys.readouterr().err


def test_cli_missing_field(tmp_path, capsys):
    path = tmp_path / "bad.json"
    d = BLOCK.to_json()
    del d["act_bytes"]
    path.write_text(json.dumps(d))
    assert main(_args(path)) == 2
    assert "'act_bytes'" in capsys.readouterr().err


def test_cli_draws_the_recommendation(costs_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert main(_args(costs_file, "-o", str(out))) == 0
    trace = json.loads(out.read_text())
    xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert xs and {e["pid"] for e in xs} == set(range(len({e["pid"] for e in xs})))


def test_cli_stage_factory_and_save_costs(tmp_path, capsys):
    saved = tmp_path / "measured.json"
    threads = torch.get_num_threads()
    try:
        assert main(["plan", "--stage", "examples.plan_stage:make_block", "--repeats", "1",
                     "--warmup", "0", "--devices", "2", "--layers", "4", "--global-batch", "8",
                     "--threads", "1", "--no-measure-runtime", "--save-costs",
                     str(saved)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "measured one block on cpu, 1 torch thread(s)" in out and "recommendation:" in out
    again = BlockCosts.load(saved)
    assert again.micro_batch == 4 and again.param_bytes > 0


def test_cli_verify_needs_a_stage_factory(costs_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(_args(costs_file, "--verify"))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--verify" in err and "needs a stage factory" in err and "--stage" in err


def _plan_json(capsys, *args):
    threads = torch.get_num_threads()
    try:
        assert main(["plan", *args, "--json"]) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(capsys.readouterr().out)


SLEEP = ["--stage", "tests.plan_stages:make_sleep_block", "--repeats", "3", "--warmup", "1",
         "--threads", "1", "--devices", "2", "--layers", "4", "--global-batch", "8",
         "--schedules", "1f1b", "dualpipev"]


def test_cli_verify_runs_the_recommendation_and_a_runner_up(capsys):
    """A functional test, not a performance promise: per-sample sleep blocks (the
    planner's linear model holds for them exactly) on 2 local ranks; the memory cap
    leaves only P = 2 feasible, so both runs are real 2-rank pipelines.  The ratio is only
    checked to lie in a loose sanity band (0.5-2.0); docs/performance.md §9 gives the
    ratios measured on a real block."""
    d = _plan_json(capsys, *SLEEP, "--memory-cap", "3000", "--verify", "--verify-steps", "3",
                   "--verify-warmup", "1")
    rec = d["recommendation"]
    assert rec["ranks"] == 2
    vs = d["verify"]["candidates"]
    assert [v["role"] for v in vs] == ["recommendation", "runner-up"], d["verify"]
    assert (vs[0]["schedule"], vs[0]["chunks"]) == (rec["schedule"], rec["chunks"])
    assert (vs[1]["schedule"], vs[1]["ranks"]) != (rec["schedule"], rec["ranks"])
    for v in vs:
        assert v["ranks"] == 2 and v["dp"] == 1 and v["status"] == FEASIBLE
        assert v["measured"] > 0 and v["predicted"] > 0 and len(v["step_times"]) == 3
        assert 0.5 < v["ratio"] < 2.0, v
        assert v["ratio"] == pytest.approx(v["measured"] / v["predicted"])
    # DP = 1: what ran is the candidate itself, so the prediction is its step time
    assert vs[0]["predicted"] == pytest.approx(rec["step_time"], rel=1e-12)
    # the breakdown: every kind the schedule runs, each measured near its profiled
    # compute (sleep blocks; B = 2 F, so a kind mapped to the wrong cost lands at 0.5
    # or 2), the time between actions, and the replay with the measured figures
    for v in vs:
        kinds = set(v["actions"])
        assert {"F"} < kinds <= {"F", "B", "I", "W", "FB"}, v["actions"]
        for k, a in v["actions"].items():
            assert a["count"] > 0 and 0.7 < a["measured"] / a["predicted"] < 1.6, (k, a)
        assert v["between"] >= 0 and v["overhead"] is not None
        assert 0.5 < v["replay_ratio"] < 2.0, v
        assert v["replay_ratio"] == pytest.approx(v["measured"] / v["replayed"])
    # the re-profile with the run: each of the 2 ranks before and after, at the
    # candidate's micro-batch (per-sample sleeps: F = m x F_ROW per block), and the
    # schedule priced again with the median of those profiles (the scaling and the
    # note: test_verify_reprofile_prices_the_median_..., with scripted ranks)
    from tests.plan_stages import B_ROW, F_ROW, W_ROW
    for v in vs:
        prof = v["profiled"]
        assert len(prof["each"]) == 4 and prof["blocks"] == 1
        cand = next(c for c in d["candidates"] if (c["schedule"], c["ranks"], c["chunks"])
                    == (v["schedule"], 2, v["chunks"]))
        m, k, mean = v["micro_batch"], cand["layers_per_stage"], prof["median"]
        # loose, like the actions above: in the ranks (2 processes and gloo's threads on
        # 2 cores) the sleeps wake up late (seen: W 1.6x its nominal in a full-suite run)
        for key, nominal in (("f", F_ROW), ("b", B_ROW), ("w", W_ROW)):
            assert 0.7 < mean[key] / (m * nominal) < 2.0, (key, m, prof)
        want = simulate(get_schedule(v["schedule"], 2, v["chunks"]), planmod.charged_costs(
            mean["f"] * k, mean["b"] * k, mean["w"] * k, None, v["overhead"],
            cand["costs"]["latency"])).makespan
        assert v["reprofiled"] == pytest.approx(want, rel=1e-12)
        assert 0.5 < v["reprofile_ratio"] < 2.0 and v["profile_spread"] >= 1.0, v
    # --no-verify-reprofile: verify(profile=None), which re-profiles nothing (next test)
    parser = argparse.ArgumentParser()
    planmod.add_arguments(parser)
    assert not parser.parse_args([*SLEEP, "--no-verify-reprofile"]).verify_reprofile
    assert parser.parse_args(SLEEP).verify_reprofile


def test_overhead_rule_and_its_inverse():
    """One rule for the overhead per action (F, I, W once; B and F&B twice):
    :func:`compute_of` undoes :func:`charged_costs`, and stage_costs charges it."""
    c = planmod.charged_costs(3.0, 5.0, 2.0, 7.0, 0.25, 0.1)
    assert (c.f, c.b, c.w, c.pair, c.latency) == (3.25, 5.5, 2.25, 7.5, 0.1)
    assert planmod.compute_of(c, 0.25) == {"F": 3.0, "B": 5.0, "I": 3.0, "W": 2.0, "FB": 7.0}
    block = BlockCosts(**{**BLOCK.to_json(), "overhead": 1e-4})
    sc = planmod.stage_costs(block, 3, block.micro_batch)
    got = planmod.compute_of(sc, 1e-4)
    assert (got["F"], got["B"], got["W"]) == pytest.approx((3 * block.f, 3 * block.b,
                                                            3 * block.w), rel=1e-12)


def test_verify_runs_the_replicas_of_a_data_parallel_candidate():
    """P = 1, DP = 2: both replicas run (2 local ranks) and all-reduce their gradients
    after every step; that synchronisation is timed apart from ``step()`` and priced by
    ``grad_sync_time`` at this host's all-reduce, fitted in the run (loose sanity bands:
    a functional check).  ``replicas=1`` runs one replica and says the data-parallel
    part is not verified."""
    from tests.plan_stages import make_sleep_block
    prof = planmod.profile_stage(make_sleep_block, repeats=3, warmup=1)
    p = plan(prof.costs, devices=2, layers=4, global_batch=8, schedules=["1f1b"])
    c = next(c for c in p.candidates if (c.ranks, c.dp, c.chunks) == (1, 2, 2))
    v = planmod.verify(c, "tests.plan_stages:make_sleep_block", steps=3, warmup=1,
                       block=p.block)
    assert v.replicas == 2 and v.global_batch_run == 2 * c.micro_batch * c.chunks == 8
    assert v.predicted == pytest.approx(c.pipeline_time, rel=1e-12)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert (v.note is None) == (cores >= 2), v.note  # 2 ranks x 1 thread: fits 2 cores
    assert 0.5 < v.ratio < 2.0, v
    assert set(v.actions) == {"F", "B"} and v.overhead is None  # 1F1B; none given
    assert v.reprofiled is None and v.profiled is None  # verify(profile=None)
    text = planmod.breakdown(v)
    assert text.startswith("actions measured/predicted: B ") and ", F " in text, text
    assert "between actions" in text and "predicted)" not in text
    assert f"measured/replayed {v.replay_ratio:.3f}" in text
    # the all-reduce: fitted to the two sizes timed by both replicas, the larger slower
    a = v.all_reduce
    assert a["sizes"] == list(planmod.ALL_REDUCE_SIZES) and a["seconds"][1] > a["seconds"][0]
    assert 0 < a["latency"] < 0.05 and 1e6 < a["bandwidth"] < math.inf, a
    host = planmod.GradSync(a["bandwidth"], a["latency"])
    want = planmod.grad_sync_time(host, p.block, get_schedule("1f1b", 1, 2),
                                  c.layers_per_stage, 2)
    assert v.sync_predicted == pytest.approx(want, rel=1e-12) and want > 0
    assert len(v.sync_times) == 3 and all(t > 0 for t in v.sync_times)
    # loose: a small gloo all-reduce on this VM takes 0.1-0.5 ms, now and then 5 ms
    assert 0.2 < v.sync_ratio < 50, v
    assert v.with_sync_predicted == pytest.approx(v.predicted + v.sync_predicted)
    assert v.with_sync_measured >= v.measured * 0.99
    line = planmod.sync_line(v)
    assert "the all-reduce over DP=2 replicas" in line and "this host's all-reduce" in line
    assert line in planmod.verify_table([v], [])
    # the all-reduces alone: the last rank to finish step() waits for no other replica
    assert 0 < v.in_all_reduce <= v.sync_measured * 1.5 and 0.1 < v.all_reduce_ratio < 50, v
    one = planmod.verify(c, "tests.plan_stages:make_sleep_block", steps=2, warmup=1,
                         replicas=1, block=p.block)
    assert one.replicas == 1 and one.global_batch_run == 4
    assert "data-parallel part is not verified" in one.note
    assert one.sync_measured is None and one.all_reduce is None  # 1F1B: nothing to sync
    with pytest.raises(ValueError, match="replicas must be 1 or the candidate's DP=2"):
        planmod.verify(c, "tests.plan_stages:make_sleep_block", replicas=3)


def test_measured_costs_take_means_plus_the_time_between_actions():
    """The replay's costs: each kind's mean (a makespan adds the tail too) plus the
    time between two actions; B from I + W when only the split ran (two actions, two
    gaps); kinds that did not run keep the prediction."""
    pred = Costs(f=1.0, b=2.0, w=1.0, fb=2.5, latency=0.25)
    c = planmod.measured_costs(pred, {"F": [1.0, 3.0], "I": [2.0], "W": [1.0, 1.0, 1.0]},
                               between=0.5)
    assert (c.f, c.w, c.b, c.fb, c.latency) == (2.5, 1.5, 4.0, 2.5, 0.25)
    c = planmod.measured_costs(pred, {"B": [3.0], "FB": [4.0]})
    assert (c.f, c.b, c.w, c.fb) == (1.0, 3.0, 1.0, 4.0)
    # a measured W longer than the measured B (noise) cannot make invalid costs
    c = planmod.measured_costs(pred, {"B": [1.0], "W": [1.5]})
    assert c.b == c.w == 1.5


def test_verify_candidates_skip_pipelines_larger_than_the_limit():
    assert planmod.verify_candidates(plan(BLOCK, **SMALL, memory_cap=0))[0] == []
    # the cap (150 kB) rejects every P = 1 (8 blocks' parameters x 4 = 160 kB) candidate
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES, memory_cap=150_000)
    rec = p.recommendation
    assert rec.ranks > 1
    picked, notes = planmod.verify_candidates(p, max_ranks=1)
    # the runner-up is the best candidate that fits on one rank: one the cap rejected
    assert [(role, c.ranks, c.status) for role, c in picked] == [("runner-up", 1, OVER_MEMORY)]
    assert picked[0][1] is next(c for c in p.candidates if c.priced and c.ranks == 1)
    assert any("not run" in n and "--verify-max-ranks 1" in n for n in notes), notes
    assert any("skipped" in n for n in notes), notes
    both, _ = planmod.verify_candidates(p)
    assert [role for role, _c in both] == ["recommendation", "runner-up"]
    assert (both[1][1].schedule, both[1][1].ranks) != (rec.schedule, rec.ranks)


def test_cli_help_says_what_is_not_in_this_version(capsys):
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    out = capsys.readouterr().out
    assert "--verify" in out and "--comm-sms" in out and "all-reduce" in out
    assert "Not in this version: --verify on CUDA blocks" in " ".join(out.split())


def test_min_micro_batch_rejects_smaller_micro_batches():
    free = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES)
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES, min_micro_batch=2)
    assert free.recommendation.micro_batch == 1  # the linear model likes them small
    small = [c for c in p.candidates if c.micro_batch == 1]
    assert small and all(not c.priced and "--min-micro-batch 2" in c.reason for c in small)
    assert all(c.micro_batch >= 2 for c in p.candidates if c.priced)
    assert p.recommendation.micro_batch >= 2


def test_bubble_fraction_is_the_simulated_idle_over_the_makespan():
    p = plan(BLOCK, **SMALL, schedules=["1f1b"])
    c = next(c for c in p.candidates if (c.ranks, c.chunks) == (4, 4))
    res = p.simulate(c)
    assert c.bubble_fraction == pytest.approx(max(res.idle) / res.makespan)
    assert 0 < c.bubble_fraction < 1


def test_cli_unknown_schedule(costs_file, capsys):
    assert main(_args(costs_file, "--schedules", "1f1b", "nope")) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "dualpipe" in err


def test_cli_bad_memory_cap(costs_file, capsys):
    with pytest.raises(SystemExit) as e:
        main(_args(costs_file, "--memory-cap", "8 gigs"))
    assert e.value.code == 2
    assert "e.g. 8GiB" in capsys.readouterr().err


class _Overlapping(nn.Module):
    """A block whose overlapped F&B costs a known 30 ms more than its own work."""

    def __init__(self, fail=False):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.fail = fail

    def forward(self, x):
        return self.lin(x)

    @staticmethod
    def overlapped_forward_backward(m0, ins0, crit0, lab0, m1, loss1, outs1, grads1):
        import time
        if m0.fail:
            raise RuntimeError("needs an expert-parallel group")
        assert crit0 is None and loss1 is None and len(outs1) == len(grads1) == 1
        out0 = m0(*ins0)
        torch.autograd.backward(outs1, grads1)
        time.sleep(0.030)
        return out0, None


def test_profile_measures_overlapped_forward_backward():
    prof = planmod.profile_stage(lambda: (_Overlapping(), torch.randn(2, 4), None),
                                 repeats=3, warmup=1)
    # measured through overlapped_forward_backward: its 30 ms sleep plus its own work
    # (a sleep on this VM wakes up to a few ms late; F + B alone would be ~0.1 ms)
    assert 0.030 <= prof.costs.fb < 0.030 * 1.5 + prof.costs.f + prof.costs.b
    assert any("overlapped_forward_backward" in n for n in prof.notes)


def test_profile_overlapped_failure_falls_back_with_a_note():
    prof = planmod.profile_stage(lambda: (_Overlapping(fail=True), torch.randn(2, 4), None),
                                 repeats=1, warmup=0)
    assert prof.costs.fb is None
    assert any("needs an expert-parallel group" in n and "f + b" in n for n in prof.notes)


# --------------------------------------------------------------------------- the runtime's
# own costs and per-micro-batch profiles


def test_overhead_is_charged_per_action_as_the_docs_say():
    o = 2e-4
    block = BlockCosts(**{**BLOCK.to_json(), "bandwidth": BLOCK.bandwidth, "overhead": o})
    p = plan(block, **SMALL, schedules=SMALL_SCHEDULES)
    base = {(c.schedule, c.ranks, c.chunks): c
            for c in plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES).candidates if c.priced}
    for c in p.candidates:
        if not c.priced:
            continue
        b0 = base[(c.schedule, c.ranks, c.chunks)].costs
        assert (c.costs.f, c.costs.b, c.costs.w) == pytest.approx((b0.f + o, b0.b + 2 * o,
                                                                   b0.w + o), rel=1e-12)
        assert c.costs.latency == b0.latency
        s = get_schedule(c.schedule, c.ranks, c.chunks)
        assert c.step_time == pytest.approx(simulate(s, c.costs).makespan, rel=1e-12)
        assert c.step_time > base[(c.schedule, c.ranks, c.chunks)].step_time
    assert BlockCosts.from_json(block.to_json()) == block
    with pytest.raises(ValueError, match="'overhead'"):
        BlockCosts(**{**BLOCK.to_json(), "bandwidth": 1e8, "overhead": -1.0})


def test_costs_measured_at_each_micro_batch_replace_the_linear_scaling():
    seen = []

    def costs_at(m):
        seen.append(m)
        # not linear: a fixed 1 ms per block on top of 0.1 ms per sample
        return BlockCosts(f=1e-3 + 1e-4 * m, b=2e-3 + 2e-4 * m, w=1e-3 + 1e-4 * m,
                          act_bytes=100 * m, param_bytes=5000, boundary_bytes=40 * m,
                          micro_batch=m, latency=1e-5, bandwidth=1e8)
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES, costs_at=costs_at)
    priced = [c for c in p.candidates if c.priced]
    assert sorted(seen) == sorted({c.micro_batch for c in priced})  # once per size
    for c in priced:
        want = planmod.stage_costs(costs_at(c.micro_batch), c.layers_per_stage, c.micro_batch)
        assert (c.costs.f, c.costs.b, c.costs.w, c.costs.latency) == pytest.approx(
            (want.f, want.b, want.w, want.latency), rel=1e-12)
        s = get_schedule(c.schedule, c.ranks, c.chunks)
        res = simulate(s, c.costs)
        assert c.step_time == pytest.approx(res.makespan, rel=1e-12)
        assert c.activation_memory == math.ceil(max(res.peak_activations)
                                                * c.layers_per_stage * 100 * c.micro_batch)
    d = p.to_json()
    assert [e["micro_batch"] for e in d["measured_at"]] == sorted(set(seen))
    assert all(e["rank_blocks"] is None for e in d["measured_at"])
    assert any("measured at each micro-batch size" in a for a in d["assumptions"])
    assert not plan(BLOCK, **SMALL).to_json()["measured_at"]


def test_profile_at_another_micro_batch_size():
    """The example repeated to ``m`` rows: per-sample sleep layers (40/80/40 ms at 20
    rows) measure ``m`` times their per-sample costs within 5 %; bytes are exact."""
    from tests.plan_stages import DIM, F_ROW, B_ROW, W_ROW, make_sleep_block
    prof = planmod.profile_stage(make_sleep_block, repeats=7, warmup=1, micro_batch=20)
    c = prof.costs
    assert c.micro_batch == 20 and c.boundary_bytes == 20 * DIM * 4
    assert c.f == pytest.approx(20 * F_ROW, rel=0.05)
    assert c.b == pytest.approx(20 * B_ROW, rel=0.05)
    assert c.w == pytest.approx(20 * W_ROW, rel=0.05)
    with pytest.raises(ValueError, match="micro_batch"):
        planmod.profile_stage(make_sleep_block, micro_batch=0)


def test_measure_runtime_fits_the_overhead_to_the_calibration_step():
    """2 spawned gloo ranks: the overhead it reports is the one at which the simulator
    reproduces the calibration pipeline's measured step (the fit is exact up to the
    bisection), and the transfer figures are positive."""
    rt = planmod.measure_runtime(boundary_bytes=4096, repeats=3, warmup=1)
    assert rt.latency > 0 and rt.bandwidth > 0 and rt.overhead >= 0 and rt.step > 0
    name, P, N = planmod._CALIBRATION
    f0, b0 = rt.bare
    assert 0 < f0 and 0 < b0
    got = simulate(get_schedule(name, P, N), Costs(f=f0 + rt.overhead, b=b0 + 2 * rt.overhead,
                                                   w=0.0, latency=rt.latency)).makespan
    if rt.overhead > 0:
        assert got == pytest.approx(rt.step, rel=1e-9)
    else:  # the bare costs and transfers alone already reach the measured step
        assert got >= rt.step and rt.notes
    assert "overhead per action" in rt.describe()


def test_cli_stage_says_where_the_transport_figures_came_from(capsys):
    threads = torch.get_num_threads()
    try:
        assert main(["plan", "--stage", "examples.plan_stage:make_block", "--repeats", "1",
                     "--warmup", "0", "--devices", "2", "--layers", "4", "--global-batch", "8",
                     "--threads", "1", "--no-measure-runtime", "--no-each-micro-batch",
                     "--overhead", "1e-4"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "measured the runtime" not in out and "measured at a micro-batch" not in out
    assert "runtime overhead 0.0001 s per action (--latency/--bandwidth/--overhead)" in out
    with pytest.raises(SystemExit) as e:
        main(_args(pathlib.Path("unused.json"), "--overhead", "-1"))
    assert e.value.code == 2


def test_grad_sync_is_added_after_the_pipeline_when_modelled():
    sync = planmod.GradSync(bandwidth=1e6, latency=1e-4)
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES, grad_sync=sync)
    base = {(c.schedule, c.ranks, c.chunks): c
            for c in plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES).candidates if c.priced}
    for c in (c for c in p.candidates if c.priced):
        b = base[(c.schedule, c.ranks, c.chunks)]
        assert b.grad_sync_time is None and b.step_time == b.pipeline_time
        assert c.pipeline_time == b.pipeline_time
        s = get_schedule(c.schedule, c.ranks, c.chunks)
        # sync_grads: the gradients of every stage module the rank holds (DualPipe,
        # DualPipeV: two) all-reduced; DualPipe's two copies summed with the partner
        module = BLOCK.param_bytes * c.layers_per_stage
        reduced = module * len(s.placement[0])
        want = 0.0
        if c.schedule == "dualpipe" and c.dp == 1:  # one swap of both modules
            want += BLOCK.latency + 2 * module / BLOCK.bandwidth
        elif c.schedule == "dualpipe":  # one module there, one back; the primaries reduced
            want += 2 * (BLOCK.latency + module / BLOCK.bandwidth)
            reduced = module
        if c.dp > 1:  # the ring all-reduce, after the small one of the has-grad flags
            want += 2 * (c.dp - 1) / c.dp * reduced / 1e6 + 2 * 2 * (c.dp - 1) * 1e-4
        assert c.grad_sync_time == pytest.approx(want, rel=1e-12), c.label()
        assert c.step_time == pytest.approx(c.pipeline_time + want, rel=1e-12)
    # a slow all-reduce moves the recommendation off the most data-parallel layout
    free = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES).recommendation
    slow = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES,
                grad_sync=planmod.GradSync(bandwidth=1e4)).recommendation
    assert free.dp == 4 and slow.dp < free.dp
    assert "synchronisation" in p.to_json()["assumptions"][0]
    with pytest.raises(ValueError, match="--grad-sync-bandwidth"):
        planmod.GradSync(bandwidth=0)
    s = get_schedule("1f1b", 2, 4)
    assert planmod.grad_sync_time(None, BLOCK, s, 2, 1) == 0.0  # DP = 1: nothing to reduce
    with pytest.raises(ValueError, match="DP=2 replicas needs its network's figures"):
        planmod.grad_sync_time(None, BLOCK, s, 2, 2)


def test_fit_all_reduce_recovers_the_ring_model():
    """Two all-reduces priced by the ring model give back its latency and bandwidth, for
    any DP; noise that makes the large one no slower gives an infinite bandwidth."""
    for dp, lat, bw in ((2, 1e-4, 1e9), (3, 5e-5, 2e8), (8, 0.0, 1e10)):
        hops = 2 * (dp - 1)
        sizes = (4, 4 << 20)
        secs = tuple(hops * lat + hops / dp * n / bw for n in sizes)
        g = planmod.fit_all_reduce(dp, sizes, secs)
        assert (g.latency, g.bandwidth) == (pytest.approx(lat, abs=1e-15), pytest.approx(bw))
        # and grad_sync_time then prices an all-reduce of n bytes as the model says
        n = 12345
        sched = get_schedule("1f1b", 1, 2)
        block = BlockCosts(**{**BLOCK.to_json(), "param_bytes": n})
        assert planmod.grad_sync_time(g, block, sched, 1, dp) == pytest.approx(
            2 * hops * lat + hops / dp * n / bw)
    g = planmod.fit_all_reduce(2, (4, 4 << 20), (2e-4, 1e-4))
    assert g.bandwidth == math.inf and g.latency == pytest.approx(1e-4)
    for bad in ((1, (4, 8)), (2, (8, 4))):
        with pytest.raises(ValueError):
            planmod.fit_all_reduce(bad[0], bad[1], (1.0, 2.0))


def test_cli_grad_sync_column_and_bad_value(costs_file, capsys):
    assert main(_args(costs_file, "--grad-sync-bandwidth", "1e6")) == 0
    out = capsys.readouterr().out
    assert "sync ms" in out and "gradient synchronisation)" in out
    assert main(_args(costs_file, "--grad-sync-bandwidth", "-5")) == 2
    assert "--grad-sync-bandwidth" in capsys.readouterr().err


def test_profile_a_stage_of_several_blocks_reports_per_block_figures():
    """Per-sample sleep layers: a stage of 3 fresh blocks at 10 rows (20/40/20 ms per
    block) gives per-block F, B, W within 5 %; bytes are per block, exactly."""
    from tests.plan_stages import DIM, F_ROW, B_ROW, W_ROW, make_sleep_block
    one = planmod.profile_stage(make_sleep_block, repeats=1, warmup=0, micro_batch=10)
    prof = planmod.profile_stage(make_sleep_block, repeats=7, warmup=1, micro_batch=10,
                                 blocks=3)
    c = prof.costs
    assert prof.blocks == 3 and "a stage of 3 blocks" in prof.describe()
    assert c.f == pytest.approx(10 * F_ROW, rel=0.05)
    assert c.b == pytest.approx(10 * B_ROW, rel=0.05)
    assert c.w == pytest.approx(10 * W_ROW, rel=0.05)
    assert (c.param_bytes, c.act_bytes) == (one.costs.param_bytes, one.costs.act_bytes)
    assert c.boundary_bytes == 10 * DIM * 4
    lin = lambda: (nn.Linear(8, 8), torch.randn(5, 8), None)  # noqa: E731
    one, three = (planmod.profile_stage(lin, repeats=1, warmup=0, blocks=n).costs
                  for n in (1, 3))
    assert three.param_bytes == one.param_bytes == (8 * 8 + 8) * 4
    assert three.act_bytes == one.act_bytes > 0  # each block saves its own input
    with pytest.raises(ValueError, match="blocks"):
        planmod.profile_stage(make_sleep_block, blocks=0)


def test_costs_measured_per_rank_block_count():
    """``rank_blocks=True``: each candidate is priced with the block measured at its
    micro-batch as a stage of the blocks one of its ranks holds (k x stages_per_rank:
    DualPipe and DualPipeV hold two stages, 1F1B one), once per pair."""
    seen = []

    def costs_at(m, blocks):
        seen.append((m, blocks))
        # a bigger working set is slower per block (cache): 1 % per block held
        g = 1 + 0.01 * blocks
        return BlockCosts(f=1e-3 * g * m, b=2e-3 * g * m, w=1e-3 * g * m, act_bytes=100 * m,
                          param_bytes=5000, boundary_bytes=40 * m, micro_batch=m,
                          latency=1e-5, bandwidth=1e8)
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES, costs_at=costs_at, rank_blocks=True)
    priced = [c for c in p.candidates if c.priced]
    assert len(seen) == len(set(seen))  # once per (micro-batch, blocks)
    pairs = set()
    for c in priced:
        s = get_schedule(c.schedule, c.ranks, c.chunks)
        held = c.layers_per_stage * s.stages_per_rank
        assert held == c.layers_per_stage * (2 if c.schedule.startswith("dualpipe") else 1)
        pairs.add((c.micro_batch, held))
        want = planmod.stage_costs(costs_at(c.micro_batch, held), c.layers_per_stage,
                                   c.micro_batch)
        assert (c.costs.f, c.costs.b, c.costs.w) == pytest.approx((want.f, want.b, want.w),
                                                                  rel=1e-12)
    assert set(seen[:len(pairs)]) == pairs
    d = p.to_json()
    assert {(e["micro_batch"], e["rank_blocks"]) for e in d["measured_at"]} == pairs
    assert any("as many blocks as one rank of the candidate holds" in a
               for a in d["assumptions"])


def test_cli_profile_blocks_per_rank(capsys):
    """``--profile-blocks rank``: the CLI profiles the block once per (micro-batch, blocks
    per rank) the plan prices, and says so; a bad value exits 2 naming the choices."""
    d = _plan_json(capsys, *SLEEP, "--global-batch", "4", "--no-measure-runtime",
                   "--repeats", "1", "--warmup", "0", "--profile-blocks", "rank")
    got = {(e["micro_batch"], e["rank_blocks"]) for e in d["measured_at"]}
    want = set()
    for c in d["candidates"]:
        if c["step_time"] is not None:
            spr = 2 if c["schedule"] == "dualpipev" else 1
            want.add((c["micro_batch"], c["layers_per_stage"] * spr))
    assert got == want and len(want) >= 3
    for bad in ("0", "ranks", "-2"):
        with pytest.raises(SystemExit) as e:
            main(["plan", *SLEEP, "--profile-blocks", bad])
        assert e.value.code == 2
        assert "want a number of blocks >= 1 or 'rank'" in capsys.readouterr().err


def _fake_rank(profiles, spans=((0.0, 0.1),), sync_ends=(0.1,), all_reduce=(), p2p=(),
               parts=None):
    """What one :func:`planmod._verify_rank` returns, with the given re-profiles."""
    return {"spans": list(spans), "sync_ends": list(sync_ends), "p2p": list(p2p),
            "sync_parts": list(parts or [(0.0, 0.0)] * len(spans)),
            "actions": {"F": [0.01], "B": [0.02]}, "between": [0.0, 0],
            "profiled": profiles, "all_reduce": list(all_reduce)}


def test_verify_times_the_gradient_sync_after_the_last_rank_s_step(monkeypatch):
    """With the ranks' answers scripted: the synchronisation of a step is the last
    rank's end of it less the last rank's end of ``step()`` (a replica done early waits
    inside the all-reduce), and its parts are the last rank's; the all-reduce and the
    swap with the partner are fitted to the median over the ranks of each size, and the
    prediction is ``grad_sync_time`` at those figures; DualPipe at DP = 1 prices its
    exchange alone, with no all-reduce."""
    import dualpipe.launch as launch
    p = plan(BLOCK, **SMALL, schedules=["dualpipe"])
    c = next(c for c in p.candidates if c.priced and (c.ranks, c.dp) == (2, 2))
    k = c.layers_per_stage
    ranks = [_fake_rank([], spans=[(0.0, 0.10), (1.0, 1.12)], sync_ends=[0.13, 1.125],
                        all_reduce=[1e-4, 3e-3], p2p=[1e-5, 1e-3],
                        parts=[(0.9, 0.03), (0.002, 0.004)]),
             _fake_rank([], spans=[(0.01, 0.11), (1.0, 1.10)], sync_ends=[0.12, 1.13],
                        all_reduce=[3e-4, 5e-3], p2p=[3e-5, 3e-3],
                        parts=[(0.001, 0.008), (0.9, 0.03)]),
             _fake_rank([], spans=[(0.0, 0.09), (1.0, 1.11)], sync_ends=[0.115, 1.128],
                        all_reduce=[2e-4, 4e-3], p2p=[2e-5, 2e-3]),
             _fake_rank([], spans=[(0.0, 0.10), (1.0, 1.11)], sync_ends=[0.12, 1.129],
                        all_reduce=[2e-4, 4e-3], p2p=[2e-5, 2e-3])]
    monkeypatch.setattr(launch, "run_ranks", lambda fn, world, cfg, **kw: (
        ranks if (world, cfg["replicas"], cfg["sync"]) == (4, 2, True) else 1 / 0))
    v = planmod.verify(c, "tests.plan_stages:make_sleep_block", block=p.block)
    assert v.step_times == pytest.approx([0.11, 0.12])
    assert v.sync_times == pytest.approx([0.13 - 0.11, 1.13 - 1.12])
    assert v.with_sync_measured == pytest.approx(statistics.median([0.13, 0.13]))
    sizes = planmod.ALL_REDUCE_SIZES
    host = planmod.fit_all_reduce(2, sizes, (2e-4, 4e-3))
    lat, bw = planmod.fit_transfer(sizes, (2e-5, 2e-3))
    assert (v.all_reduce["latency"], v.all_reduce["bandwidth"]) == pytest.approx(
        (host.latency, host.bandwidth))
    assert (v.p2p["latency"], v.p2p["bandwidth"]) == pytest.approx((lat, bw))
    s = get_schedule("dualpipe", 2, c.chunks)
    via = BLOCK.with_transport(lat, bw)
    want = planmod.grad_sync_time(host, via, s, k, 2)
    exchange, reduce = planmod.sync_parts(host, via, s, k, 2)
    assert want == exchange + reduce and exchange > 0 and reduce > 0
    assert v.sync_predicted == pytest.approx(want, rel=1e-12)
    assert v.sync_ratio == pytest.approx(statistics.median(v.sync_times) / want)
    # the parts: the last rank to finish step() each time (rank 1, then rank 0)
    assert v.in_all_reduce == pytest.approx(statistics.median([0.008, 0.004]))
    assert v.in_exchange == pytest.approx(statistics.median([0.001, 0.002]))
    assert v.all_reduce_predicted == pytest.approx(reduce)
    assert v.all_reduce_ratio == pytest.approx(v.in_all_reduce / reduce)
    assert v.exchange_predicted == pytest.approx(exchange)
    assert v.exchange_ratio == pytest.approx(v.in_exchange / exchange)
    line = planmod.sync_line(v)
    assert "DualPipe's exchange + the all-reduce over DP=2" in line
    assert "inside the all-reduces" in line and "in the exchange" in line
    assert "swap with the partner rank" in line and "this host's all-reduce" in line
    # DP = 1: the exchange alone, no all-reduce timed; no block: measured, not predicted
    c1 = next(c for c in p.candidates if c.priced and (c.ranks, c.dp) == (4, 1))
    monkeypatch.setattr(launch, "run_ranks", lambda fn, world, cfg, **kw: [
        _fake_rank([], p2p=[1e-5, 1e-3]) for _ in range(world)]
        if cfg["replicas"] == 1 else 1 / 0)
    v1 = planmod.verify(c1, "tests.plan_stages:make_sleep_block", block=p.block)
    lat1, bw1 = planmod.fit_transfer(sizes, (1e-5, 1e-3))
    assert v1.all_reduce is None and v1.in_all_reduce is None
    assert v1.sync_predicted == pytest.approx(planmod.grad_sync_time(
        None, BLOCK.with_transport(lat1, bw1), get_schedule("dualpipe", 4, c1.chunks),
        c1.layers_per_stage, 1)) == v1.exchange_predicted
    assert "(DualPipe's exchange)" in planmod.sync_line(v1)
    v0 = planmod.verify(c1, "tests.plan_stages:make_sleep_block")
    assert v0.sync_measured == 0.0 and v0.sync_predicted is None and v0.p2p is not None


def test_verification_json_has_no_infinity():
    """A fitted bandwidth is infinite when the large transfer was no slower (noise): the
    JSON says null there, as BlockCosts.to_json does, not the invalid ``Infinity``."""
    c = plan(BLOCK, **SMALL, schedules=["1f1b"]).recommendation
    fit = {"latency": 1e-4, "bandwidth": math.inf, "sizes": [4, 8], "seconds": [1e-4, 1e-4]}
    v = planmod.Verification("recommendation", c, predicted=1.0, measured=1.0, ratio=1.0,
                             all_reduce=dict(fit), p2p={**fit, "bandwidth": 1e9})
    d = v.to_json()
    assert d["all_reduce"]["bandwidth"] is None and d["p2p"]["bandwidth"] == 1e9
    assert v.all_reduce["bandwidth"] == math.inf  # the object itself keeps it
    json.dumps(d, allow_nan=False)
    assert "infinite" in planmod.sync_line(replace(v, sync_measured=0.001, replicas=2))


def test_fit_transfer_is_the_line_through_two_transfers():
    lat, bw = planmod.fit_transfer((4, 4 << 20), (1e-5 + 4 / 1e9, 1e-5 + (4 << 20) / 1e9))
    assert (lat, bw) == (pytest.approx(1e-5), pytest.approx(1e9))
    assert planmod.fit_transfer((4, 8), (2e-5, 1e-5)) == (2e-5, math.inf)


def test_verify_reprofile_prices_the_median_and_says_when_the_machine_is_unsteady(
        monkeypatch):
    """verify(profile=...) with the ranks' answers scripted: the schedule is priced again
    with the median of every rank's profiles (a profile at another micro-batch scaled
    linearly), and a spread of F + B over 5 % is said in the note; within 5 % it is not."""
    import dualpipe.launch as launch
    p = plan(BLOCK, devices=2, layers=4, global_batch=8, schedules=["1f1b"])
    c = next(c for c in p.candidates if c.priced and c.ranks == 2)
    k, m = c.layers_per_stage, c.micro_batch

    def prof(f):
        return {"f": f, "b": 2 * f, "w": f / 2, "fb": None}
    steady = [[prof(1e-3), prof(1.01e-3)], [prof(1.02e-3), prof(1.03e-3)]]
    unsteady = [[prof(1e-3), prof(1.5e-3)], [prof(1.2e-3), prof(1.1e-3)]]
    for answers, note, mid, at in ((steady, False, 1.015e-3, m), (unsteady, True, 1.15e-3, m),
                                   (steady, False, 1.015e-3, 2 * m)):
        monkeypatch.setattr(launch, "run_ranks",
                            lambda fn, world, cfg, **kw: [_fake_rank(a) for a in answers])
        v = planmod.verify(c, "tests.plan_stages:make_sleep_block", overhead=1e-4,
                           profile={"blocks": 1, "repeats": 1, "warmup": 0, "micro_batch": at})
        per = k * m / at
        want = simulate(get_schedule("1f1b", 2, c.chunks), planmod.charged_costs(
            mid * per, 2 * mid * per, mid / 2 * per, None, 1e-4, c.costs.latency)).makespan
        assert v.reprofiled == pytest.approx(want, rel=1e-12)
        assert v.reprofile_ratio == pytest.approx(0.1 / want)
        assert v.profiled["median"]["f"] == pytest.approx(mid)
        assert len(v.profiled["each"]) == 4 and v.profiled["micro_batch"] == at
        spread = max(max(x["f"] for x in a) for a in answers) / min(
            min(x["f"] for x in a) for a in answers)
        assert v.profile_spread == pytest.approx(spread)
        assert (v.note is not None and "not steady enough" in v.note) == note, v.note


def test_cli_verify_hands_the_plan_s_profile_settings_to_verify(monkeypatch, capsys):
    """``--verify`` re-profiles as the plan profiled: ``--profile-blocks`` (per rank:
    k x stages_per_rank), ``--repeats``/``--warmup``, and without ``--each-micro-batch``
    the example's micro-batch; ``--no-verify-reprofile`` hands ``profile=None``."""
    seen = []

    def fake_verify(c, stage, role, **kw):
        seen.append((c, kw["profile"]))
        replicas.append((c.dp, kw["replicas"], kw["block"]))
        return planmod.Verification(role, c, predicted=1.0, measured=1.0, ratio=1.0)
    replicas = []
    monkeypatch.setattr(planmod, "verify", fake_verify)
    base = [*SLEEP, "--no-measure-runtime", "--repeats", "1", "--warmup", "0", "--verify"]
    _plan_json(capsys, *base, "--profile-blocks", "rank")
    assert seen and all(prof == {"repeats": 1, "warmup": 0, "blocks": c.layers_per_stage * (
        2 if c.schedule == "dualpipev" else 1)} for c, prof in seen)
    seen.clear()
    _plan_json(capsys, *base, "--profile-blocks", "2", "--no-each-micro-batch")
    assert seen and all(prof == {"repeats": 1, "warmup": 0, "blocks": 2, "micro_batch": 2}
                        for _c, prof in seen)
    seen.clear()
    _plan_json(capsys, *base, "--no-verify-reprofile")
    assert seen and all(prof is None for _c, prof in seen)
    # the candidate's replicas run when P x DP ranks fit --verify-max-ranks, with the
    # plan's block to price their synchronisation; else, or --no-verify-dp, one
    assert any(dp == 2 for dp, _r, _b in replicas), replicas
    assert all(r == dp and b is not None for dp, r, b in replicas), replicas
    for flags, why in ((["--no-verify-dp"], "(one replica: --no-verify-dp)"),
                       (["--verify-max-ranks", "1"], "(one replica: P x DP = 2 ranks is more "
                                                     "than --verify-max-ranks 1)")):
        replicas.clear()
        threads = torch.get_num_threads()
        try:
            assert main(["plan", *base, *flags]) == 0
        finally:
            torch.set_num_threads(threads)
        assert replicas and all(r == 1 for _dp, r, _b in replicas), (flags, replicas)
        assert why in capsys.readouterr().out


def test_per_rank_profiles_without_each_micro_batch_say_they_scale_linearly():
    """``costs_at`` that measures only at the example's size (``--no-each-micro-batch``
    with ``--profile-blocks rank``): the assumptions name that size and keep the linear
    scaling; ``rank_blocks`` without ``costs_at`` is refused."""
    def costs_at(m, blocks):
        return BlockCosts(**{**BLOCK.to_json(), "f": BLOCK.f * (1 + blocks / 100)})
    p = plan(BLOCK, **SMALL, schedules=SMALL_SCHEDULES, costs_at=costs_at, rank_blocks=True)
    text = " ".join(p.assumptions)
    assert f"measured at the example's micro-batch ({BLOCK.micro_batch} samples)" in text
    assert "scale linearly with the micro-batch" in text
    with pytest.raises(ValueError, match="pass costs_at"):
        plan(BLOCK, **SMALL, rank_blocks=True)
