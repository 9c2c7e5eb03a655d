"""scripts/gpu_check.py on CPU: the step runner with fake steps (time boxes, going on after
a failure, records, the file cap, the summary printed last), the judges with made-up step
outputs, the pytest plugin, the fact collectors against a fake CUDA torch, and the
one-line refusal on a machine without CUDA.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gc = _load()
PY = sys.executable


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


CPU_ONLY = pytest.mark.skipif(_has_cuda(), reason="this machine has CUDA")


# ---- no CUDA: one line, at once -----------------------------------------------------------

@CPU_ONLY
@pytest.mark.parametrize("flags,why", [([], "CPU-only build"), (["-S"], "torch is not installed")])
def test_without_cuda_one_line_nonzero_at_once(tmp_path, flags, why):
    t0 = time.monotonic()
    out = subprocess.run([PY, *flags, str(SCRIPT), str(tmp_path / "out")], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    took = time.monotonic() - t0
    assert out.returncode == gc.EXIT_NO_CUDA
    lines = (out.stdout + out.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu-check: no CUDA here") and why in lines[0], lines
    assert took < 5, f"took {took:.1f} s"
    assert not (tmp_path / "out").exists()


def _fake_torch(tmp_path: Path, *, cuda_version="'13.0'", available=False) -> Path:
    """A package named torch with just enough for the pre-check and the env facts."""
    root = tmp_path / "faketorch"
    pkg = root / "torch"
    (pkg / "cuda").mkdir(parents=True)
    (pkg / "backends").mkdir()
    (pkg / "distributed").mkdir()
    (pkg / "utils").mkdir()
    (pkg / "version.py").write_text("from typing import Optional\n"
                                    f"cuda: Optional[str] = {cuda_version}\ngit_version = 'abc'\n")
    (pkg / "__init__.py").write_text(textwrap.dedent("""\
        __version__ = "9.9.9+fake"
        from . import version, cuda, backends, distributed, utils
        """))
    (pkg / "backends" / "__init__.py").write_text(
        "class cudnn:\n    @staticmethod\n    def version():\n        return 91000\n")
    (pkg / "distributed" / "__init__.py").write_text("def is_nccl_available():\n    return True\n")
    (pkg / "utils" / "__init__.py").write_text("")
    (pkg / "utils" / "cpp_extension.py").write_text("CUDA_HOME = None\n")
    (pkg / "cuda" / "__init__.py").write_text(textwrap.dedent(f"""\
        from . import nccl, green_contexts
        def is_available():
            return {available}
        def device_count():
            return 1 if {available} else 0
        class _Props:
            name = "Fake H200"
            major, minor = 9, 0
            multi_processor_count = 132
            total_memory = 141 * 2 ** 30
        def get_device_properties(i):
            return _Props()
        def get_arch_list():
            return ["sm_90"]
        class Stream:
            @staticmethod
            def priority_range():
                return (0, -5)
        """))
    (pkg / "cuda" / "nccl.py").write_text("def version():\n    return (2, 27, 3)\n")
    (pkg / "cuda" / "green_contexts.py").write_text(textwrap.dedent("""\
        SUPPORTED = True
        class GreenContext:
            @staticmethod
            def create(num_sms, device_id=0):
                raise RuntimeError("fake")
            def set_context(self):
                pass
        """))
    return root


def test_torch_build_is_read_without_importing_it(tmp_path):
    assert gc.torch_build_cuda(_fake_torch(tmp_path) / "torch") == (True, "13.0")
    cpu = _fake_torch(tmp_path / "cpu", cuda_version="None")
    assert gc.torch_build_cuda(cpu / "torch") == (True, None)
    assert gc.torch_build_cuda(tmp_path / "nowhere") == (False, None)


def test_precheck_reports_a_cuda_torch_that_sees_no_gpu(tmp_path):
    fake = _fake_torch(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(fake))
    why = gc.cuda_precheck(PY, device_visible=lambda: True, env=env, in_process_torch=False)
    assert why.startswith("no CUDA here: torch.cuda.is_available() is False (torch 9.9.9+fake")
    assert gc.cuda_precheck(PY, device_visible=lambda: False, in_process_torch=False) == (
        "no CUDA here: no NVIDIA GPU is visible (no /dev/nvidia* device, no nvidia-smi on PATH)")
    ok = _fake_torch(tmp_path / "ok", available=True)
    assert gc.cuda_precheck(PY, device_visible=lambda: True, in_process_torch=False,
                            env=dict(os.environ, PYTHONPATH=str(ok))) is None
    (tmp_path / "bad" / "torch").mkdir(parents=True)
    (tmp_path / "bad" / "torch" / "__init__.py").write_text("raise ImportError('libcuda.so.1: nope')\n")
    broken = gc.cuda_precheck(PY, device_visible=lambda: True, in_process_torch=False,
                              env=dict(os.environ, PYTHONPATH=str(tmp_path / "bad")))
    assert broken == "no CUDA here: importing torch failed (ImportError: libcuda.so.1: nope)"


# ---- the runner with fake steps -----------------------------------------------------------

def _step(name, code, budget=30.0, **kw):
    return gc.Step(name, budget, lambda ctx, timeout, code=code: [PY, "-c", code], **kw)


def _run(tmp_path, steps, **kw):
    lines = []
    kw.setdefault("deadline_s", 120.0)
    ok, runner = gc.run_check(tmp_path / "out", steps, echo=lines.append, **kw)
    return ok, runner, lines


def test_runner_goes_on_after_a_failure_and_records_every_step(tmp_path):
    steps = [_step("first", "print('hello'); print('x' * 5000)"),
             _step("broken", "import sys; print('boom'); sys.exit(3)"),
             _step("after", "print('still ran')")]
    ok, runner, lines = _run(tmp_path, steps)
    assert not ok
    res = {r["name"]: r for r in json.loads((tmp_path / "out" / "gpu_check.json").read_text())["steps"]}
    assert [res[n]["status"] for n in ("first", "broken", "after")] == ["ok", "FAIL", "ok"]
    assert res["broken"]["rc"] == 3 and "exit code 3" in res["broken"]["note"]
    assert "boom" in res["broken"]["tail"] and "still ran" in res["after"]["tail"]
    assert len(res["first"]["tail"]) <= gc.TAIL_CHARS + 10 and res["first"]["tail"].endswith("x\n")
    assert all(r["seconds"] >= 0 and r["argv"][0] == PY for r in res.values())
    log = (tmp_path / "out" / "steps.log").read_text()
    assert "===== broken: rc=3" in log and "hello" in log
    # the summary table is printed last, then the verdict
    assert lines[-1].startswith("[gpu-check] FAILED: 2/3 steps ok")
    table = lines[-2].splitlines()
    assert table[0].split() == ["step", "status", "rc", "seconds", "note"]
    assert [row.split()[:2] for row in table[2:]] == [["first", "ok"], ["broken", "FAIL"],
                                                      ["after", "ok"]]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "**FAILED**" in md and "| broken | FAIL | 3 |" in md


def test_runner_kills_a_step_at_its_time_box_with_its_children(tmp_path):
    pidfile = tmp_path / "child.pid"
    code = ("import subprocess, sys, time\n"
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(pidfile)!r}, 'w').write(str(c.pid))\n"
            "print('started', flush=True); time.sleep(60)\n")
    t0 = time.monotonic()
    ok, runner, _ = _run(tmp_path, [_step("hang", code, budget=2.0), _step("next", "print(1)")])
    assert time.monotonic() - t0 < 20
    hang, nxt = runner.ctx.results["hang"], runner.ctx.results["next"]
    assert hang.status == "TIMEOUT" and "killed after 2 s" in hang.note and "started" in hang.tail
    assert nxt.status == "ok"
    child = int(pidfile.read_text())
    for _ in range(50):  # the grandchild dies with its group
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's child survived the time box")


def test_results_are_written_after_each_step_and_on_sigterm(tmp_path):
    """A run killed from outside (the device tool's time limit) still leaves the steps
    so far in OUT_DIR, and the step it was running does not live on."""
    import signal
    import threading
    pidfile = tmp_path / "hang.pid"
    code = (f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
            "time.sleep(60)")
    out = tmp_path / "out"

    def term():
        for _ in range(200):
            if pidfile.exists():
                # the first step's record is on disk before the second step finishes
                assert json.loads((out / "gpu_check.json").read_text())["steps"][0]["name"] == "one"
                break
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=term, daemon=True).start()
    t0 = time.monotonic()
    ok, runner, lines = _run(tmp_path, [_step("one", "print(1)"), _step("hang", code),
                                        _step("never", "print(2)")])
    assert time.monotonic() - t0 < 30 and not ok
    rec = json.loads((out / "gpu_check.json").read_text())
    assert rec["interrupted"] == "SIGTERM" and not rec["finished"]
    assert [s["name"] for s in rec["steps"]] == ["one"]
    assert "INTERRUPTED (SIGTERM)" in (out / "summary.md").read_text()
    hung = int(pidfile.read_text())
    for _ in range(50):
        try:
            with open(f"/proc/{hung}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # dead, not yet reaped by whoever started it
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the interrupted step survived")


def test_global_deadline_skips_what_no_longer_fits(tmp_path):
    steps = [_step("slow", "import time; time.sleep(2.5)", budget=10.0),
             _step("late", "print(1)")]
    ok, runner, _ = _run(tmp_path, steps, deadline_s=3.0, reserve_s=0.0, min_step_s=1.0)
    slow, late = runner.ctx.results["slow"], runner.ctx.results["late"]
    assert slow.timeout_s <= 3.0
    assert late.status == "SKIPPED" and "global deadline" in late.note
    assert not ok


def test_judgements_errors_and_skips(tmp_path):
    def fail_judge(ctx, res):
        return gc.Verdict(False, "looked wrong", {"seen": 1})

    def broken_judge(ctx, res):
        raise KeyError("missing")

    def bad_argv(ctx, timeout):
        raise RuntimeError("no interpreter")
    steps = [_step("judged", "print(1)", judge=fail_judge),
             _step("crashy", "print(1)", judge=broken_judge),
             gc.Step("noargv", 5, bad_argv),
             _step("left-out", "print(1)"),
             gc.Step("missing-binary", 5, lambda ctx, t: ["/nonexistent/binary"])]
    ok, runner, _ = _run(tmp_path, steps, skip=["left-out"])
    r = runner.ctx.results
    assert (r["judged"].status, r["judged"].note, r["judged"].facts) == ("FAIL", "looked wrong", {"seen": 1})
    assert r["crashy"].status == "FAIL" and "judging the output failed: KeyError" in r["crashy"].note
    assert r["noargv"].status == "ERROR" and "no interpreter" in r["noargv"].note
    assert r["left-out"].status == "SKIPPED" and "--skip" in r["left-out"].note
    assert r["missing-binary"].status == "ERROR" and "could not start" in r["missing-binary"].note


def test_file_cap_and_previous_results(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.md").write_text("old run")
    (out / "notes.txt").write_text("the user's")
    steps = []
    for i in range(8):
        steps.append(gc.Step(f"s{i}", 10, lambda ctx, t, i=i: [
            PY, "-c", f"open({str(ctx.path(f'a{i}.json'))!r}, 'w').write('{i}')"],
            artifacts={f"a{i}.json": f"a{i}.json"}))
    ok, runner, _ = _run(tmp_path, steps)
    assert ok
    ours = sorted(p.name for p in out.iterdir() if p.name != "notes.txt")
    assert len(ours) == gc.MAX_FILES, ours
    assert set(gc.SUMMARY_FILES) <= set(ours)
    assert (out / "summary.md").read_text() != "old run"
    assert (out / "notes.txt").read_text() == "the user's"
    record = json.loads((out / "gpu_check.json").read_text())
    assert len(record["not_written"]) == 3 + 1  # a5..a7 over the cap, and the foreign file
    assert any("notes.txt" in n for n in record["not_written"])
    assert record["files"] == ours or sorted(record["files"]) == ours


def test_scratch_is_removed_unless_kept(tmp_path):
    ok, runner, _ = _run(tmp_path, [_step("a", "print(1)")])
    assert not runner.ctx.scratch.exists()
    ok, runner, _ = _run(tmp_path, [_step("a", "print(1)")], keep_scratch=True)
    assert (runner.ctx.scratch / "a.log").is_file()


# ---- environment of the GPU steps -----------------------------------------------------------

def _ctx(tmp_path, **facts):
    ctx = gc.Context(root=tmp_path, scratch=tmp_path, out_dir=tmp_path / "out")
    ctx.env_facts = {"devices": [{"name": "Fake", "capability": "9.0", "sm_count": 132}],
                     "packages": {"pytest_timeout": "2.3"}, **facts}
    return ctx


def test_gpu_step_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    ctx = _ctx(tmp_path)
    env = gc.step_env(ctx)
    assert "TRITON_INTERPRET" not in env and env["DUALPIPE_TRITON_PIN"] == "1"
    assert env["PYTHONPATH"] == str(tmp_path)  # no build yet: the source tree
    ctx.pythonpath = ""
    assert "PYTHONPATH" not in gc.step_env(ctx)
    assert gc._with_scripts(ctx)["PYTHONPATH"] == str(gc.SCRIPTS)
    # what the caller had (e.g. carried wheels) stays, after the build's path
    monkeypatch.setenv("PYTHONPATH", "/carried/site")
    ctx.pythonpath = "/repo/build/pythonpath"
    assert gc.step_env(ctx)["PYTHONPATH"] == "/repo/build/pythonpath:/carried/site"
    build = gc._env_build(ctx)
    assert build["TORCH_CUDA_ARCH_LIST"] == "9.0" and build["PYTHON"] == ctx.python
    assert gc._env_demo(ctx)["CUBLAS_WORKSPACE_CONFIG"]


def test_build_uses_setup_sh_when_it_exists_else_build_ext(tmp_path):
    ctx = _ctx(tmp_path)
    argv = gc._argv_build(ctx, 100)
    assert argv[-3:] == ["setup.py", "build_ext", "--inplace"] and "fallback" in ctx.build_mode
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    assert gc._argv_build(ctx, 100) == ["bash", str(tmp_path / "scripts" / "setup.sh")]
    (tmp_path / "build.log").write_text("[setup] building\nDUALPIPE_PYTHON=/opt/py/bin/python3\n"
                                        "more on stderr\nDUALPIPE_PYTHONPATH=\n")
    res = gc.StepResult("build", "ok", 0, 1.0, 10.0)
    v = gc._judge_build(ctx, res)
    assert v.ok and ctx.python == "/opt/py/bin/python3" and ctx.pythonpath == ""
    (tmp_path / "build.log").write_text("oops\n")
    ctx2 = _ctx(tmp_path)
    gc._argv_build(ctx2, 100)
    v = gc._judge_build(ctx2, res)
    assert not v.ok and "no DUALPIPE_PYTHON" in v.note and ctx2.pythonpath == str(tmp_path)


def test_parse_setup_output_takes_the_last_values():
    text = "DUALPIPE_PYTHON=/a\nnoise\nDUALPIPE_PYTHON=/b\r\nDUALPIPE_PYTHONPATH=/src:/x\n"
    assert gc.parse_setup_output(text) == {"DUALPIPE_PYTHON": "/b", "DUALPIPE_PYTHONPATH": "/src:/x"}


def test_step_commands(tmp_path):
    ctx = _ctx(tmp_path)
    ctx.python = "/gpu/python"
    t = gc._argv_gpu_tests(ctx, 120)
    assert t[:3] == ["/gpu/python", "-m", "pytest"] and t[-1] == "tests"
    assert t[t.index("-m", 3) + 1] == "gpu" and "--gpu-check-force" in t and "test_kernels.py" in t
    assert t[t.index("--timeout") + 1] == "60"
    ctx.env_facts["packages"] = {}
    assert "--timeout" not in gc._argv_gpu_tests(ctx, 120)
    d = gc._argv_demo("1f1b")(ctx, 30)
    assert d[d.index("--backend") + 1] == "nccl" and d[d.index("--ranks") + 1] == "1"
    assert d[d.index("--schedule") + 1] == "1f1b"
    s = gc._argv_sm_partition(ctx, 45)
    assert s[2] == "bench.sm_partition" and s[s.index("--max-seconds") + 1] == "30"
    o = gc._argv_overlap(ctx, 60)
    assert o[2] == "bench.overlap_gpu" and str(tmp_path / "ovl") in o
    m = gc._argv_micro(ctx, 40)
    assert "--benchmark-only" in m and gc.MICRO_SELECTION in m
    names = [s.name for s in gc.default_steps()]
    assert names == ["env", "build", "build-info", "gpu-tests", "nccl-dualpipev", "nccl-1f1b",
                     "sm-partition", "overlap-bench", "plan-comm", "micro-bench"]
    arts = [n for s in gc.default_steps() for n in s.artifacts]
    assert len(arts) + len(gc.SUMMARY_FILES) <= gc.MAX_FILES
    # budgets are ceilings; together they may exceed the deadline a little (later steps
    # then get what is left), not by more than one step's worth
    assert sum(s.budget_s for s in gc.default_steps()) < gc.DEADLINE_S + 150


def test_plan_comm_step_runs_the_planner_on_a_measurement(tmp_path):
    """The plan-comm step's own command, run here on an overlap_gpu.json in the
    benchmark's format (written by the test, so this checks the command and the
    judgement, not a GPU), from the repository root as the runner runs it."""
    root = Path(__file__).resolve().parents[1]
    ctx = gc.Context(root=root, scratch=tmp_path, out_dir=tmp_path / "out")
    ctx.python = sys.executable
    (tmp_path / "ovl").mkdir()
    rows = [{"partition": "software", "compute": "cublas", "comm": "nccl_a2a",
             "comm_sms": k, "compute_sms": 132, "t_comp_ms": tc, "t_comm_ms": tm,
             "t_both_ms": tb, "comm_gbps": 128 * 2**20 / (tm / 1e3) / 1e9}
            for k, tc, tm, tb in ((8, 1.0, 4.0, 4.5), (16, 1.1, 2.0, 2.4), (24, 1.3, 1.5, 2.0))]
    (tmp_path / "ovl" / "overlap_gpu.json").write_text(json.dumps(
        {"benchmark": "overlap_gpu", "machine": {"gpu": "Fake"}, "config": {"comm_mib": 128},
         "rows": rows}))
    argv = gc._argv_plan_comm(ctx, 20)
    env = {**os.environ, "PYTHONPATH": str(root)}
    p = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    v = gc._judge_plan_comm(ctx, None)
    assert v.ok, v.note
    assert v.facts["points"] == [8, 16, 24] and v.facts["recommendation_comm_sms"] in (8, 16, 24)
    assert "comm SMs (software/cublas/nccl_a2a" in v.note
    assert not gc.judge_plan_comm({"recommendation": {"schedule": "1f1b"}}).ok


def test_arch_matches():
    assert gc.arch_matches("9.0", ["9.0"]) and gc.arch_matches("9.0", ["8.0", "9.0+PTX"])
    assert gc.arch_matches("9.0", ["9.0a"]) and gc.arch_matches("9.0", ["90"])
    assert not gc.arch_matches("9.0", ["8.0"]) and not gc.arch_matches(None, ["9.0"])
    assert not gc.arch_matches("9.0", [])


# ---- judges -----------------------------------------------------------------------------------

def _tests(*outcomes, finished=True):
    return {"finished": finished, "exitstatus": 0, "tests": [
        {"nodeid": f"tests/t.py::t{i}", "outcome": o, "reason": "needs X" if o == "skipped" else None}
        for i, o in enumerate(outcomes)]}


def test_judge_pytest_a_skip_is_a_failure():
    assert gc.judge_pytest(_tests("passed", "passed"), what="GPU tests").ok
    v = gc.judge_pytest(_tests("passed", "skipped"), what="GPU tests")
    assert not v.ok and "1 skipped" in v.note and "SKIPPED tests/t.py::t1: needs X" in v.note
    assert v.facts["not_passed"][0]["reason"] == "needs X"
    assert not gc.judge_pytest(_tests("passed", "failed"), what="x").ok
    assert not gc.judge_pytest(_tests(), what="x").ok
    v = gc.judge_pytest(_tests("passed", finished=False), what="x")
    assert not v.ok and "interrupted" in v.note.lower()
    assert gc.judge_pytest(_tests("passed", "xfailed"), what="x").ok


def _check(**kw):
    c = {"reference_device": "cuda:0", "reference_device_name": "NVIDIA H200",
         "losses_bitwise_equal": True, "losses_compared": 8, "losses_of": 8,
         "loss_max_abs_diff": 0.0, "worst_grad_cosine_distance": 3e-15,
         "grad_tensors_compared": 24, "grad_tolerance": 1e-13, "matches": True}
    c.update(kw)
    return c


def test_judge_demo_summary():
    v = gc.judge_demo_summary({"first_step_check": _check(), "loss_history": [1.5, 1.2]})
    assert v.ok and "bitwise equal (8/8" in v.note and "cuda:0 (NVIDIA H200)" in v.note
    v = gc.judge_demo_summary({"first_step_check": _check(matches=False, losses_bitwise_equal=False,
                                                          loss_max_abs_diff=1e-7),
                               "loss_history": [1.5, 1.2]})
    assert not v.ok and "DIFFER" in v.note
    assert not gc.judge_demo_summary({"first_step_check": _check(), "loss_history": [1.0, 1.1]}).ok
    v = gc.judge_demo_summary({"first_step_matches": True, "loss_history": [1.5, 1.2]})
    assert not v.ok and "no first_step_check" in v.note
    v = gc.judge_demo_summary({"first_step_check": _check(loss_max_abs_diff=None), "loss_history": []})
    assert not v.ok and "None" in v.note


def _smp_row(backend, k, comm, compute, *, shared=0, extra=0):
    from bench.sm_partition import probe_facts
    comm_ids = set(range(comm + extra))
    compute_ids = set(range(comm + extra - shared, 132))
    return {"backend": backend, "requested_comm_sms": k,
            "partition": {"comm_sms": comm, "compute_sms": compute, "enforced": "both"},
            "probe": probe_facts({"comm": comm_ids, "compute": compute_ids}, comm, compute),
            "gemm_on_compute_side": {"persistent": {"ms": 2.0, "vs_all_sms": 1.1}}}


def test_judge_sm_partition():
    good = {"auto": {"backend": "green_ctx"}, "errors": [],
            "rows": [_smp_row("green_ctx", 8, 8, 124), _smp_row("green_ctx", 16, 16, 116),
                     {"backend": "torch_green_ctx", "requested_comm_sms": 8,
                      "unavailable": "no Stream()"},
                     _smp_row("priority", 8, 8, 124, shared=8)]}
    v = gc.judge_sm_partition(good)
    assert v.ok, v.note
    assert "auto picks green_ctx" in v.note and "8->8/124 reached 8/124, shared 0, GEMM x1.10" in v.note
    shared = dict(good, rows=[_smp_row("green_ctx", 8, 8, 124, shared=4)])
    assert not gc.judge_sm_partition(shared).ok
    assert gc.judge_sm_partition(dict(good, rows=[_smp_row("green_ctx", 8, 8, 122, extra=2)])).ok
    assert not gc.judge_sm_partition(dict(good, rows=[_smp_row("green_ctx", 8, 8, 121, extra=3)])).ok
    gone = dict(good, rows=[{"backend": "green_ctx", "requested_comm_sms": 8, "unavailable": "no ext"}])
    v = gc.judge_sm_partition(gone)
    assert not v.ok and "unavailable: no ext" in v.note
    assert not gc.judge_sm_partition(dict(good, errors=[{"where": "w", "error": "e"}])).ok
    assert not gc.judge_sm_partition({"rows": []}).ok
    v = gc.judge_sm_partition(dict(good, finished=False))
    assert not v.ok and "did not finish" in v.note


def test_judge_overlap_and_micro():
    row = {"partition": "green_ctx"}
    data = {"rows": [row], "errors": [], "truncated": False, "skipped": {"sm_copy": "no ext"},
            "best_split": {"green_ctx|cublas|sm_copy": {"comm_sms": 16, "overlap_efficiency": 0.9}}}
    v = gc.judge_overlap(data)
    assert v.ok and "green_ctx|cublas|sm_copy 0.90 at 16 comm SMs" in v.note and "no ext" in v.note
    assert not gc.judge_overlap(dict(data, errors=[{"error": "x"}])).ok
    assert not gc.judge_overlap(dict(data, rows=[])).ok
    v = gc.judge_overlap(dict(data, finished=False))
    assert not v.ok and "did not finish" in v.note
    bench = {"benchmarks": [
        {"name": "test_persistent_matmul", "stats": {"median": 2e-4, "data": [1, 2]},
         "extra_info": {"tflops": 680.0}},
        {"name": "test_sm_copy[extension]", "stats": {"median": 5e-5}}]}
    v = gc.judge_micro(_tests("passed", "passed"), bench)
    assert v.ok and "680 TFLOP/s" in v.note and v.facts["medians_us"]["test_sm_copy[extension]"] == 50
    assert not gc.judge_micro(_tests("passed", "skipped"), bench).ok
    assert not gc.judge_micro(_tests("passed"), {"benchmarks": bench["benchmarks"][1:]}).ok
    assert "data" not in gc.strip_benchmark_samples(bench)["benchmarks"][0]["stats"]


# ---- the pytest plugin ----------------------------------------------------------------------

def test_plugin_records_outcomes_and_forces_the_kernel_tests(tmp_path):
    d = tmp_path / "t"
    d.mkdir()
    (d / "conftest.py").write_text(
        "def pytest_configure(config):\n"
        "    config.addinivalue_line('markers', 'gpu: needs CUDA')\n")
    (d / "test_a.py").write_text(textwrap.dedent("""\
        import pytest
        @pytest.mark.gpu
        def test_pass(): pass
        @pytest.mark.gpu
        def test_skip(): pytest.skip("no GPU here")
        @pytest.mark.gpu
        def test_fail(): assert 0
        def test_not_gpu(): pass
        """))
    (d / "test_kernels.py").write_text("def test_compiled(): pass\n")
    (d / "sub").mkdir()
    (d / "__init__.py").write_text("")  # two test_kernels.py: packages keep them apart
    (d / "sub" / "__init__.py").write_text("")
    (d / "sub" / "test_kernels.py").write_text(
        "import pytest\n@pytest.mark.gpu\ndef test_marked(): pass\ndef test_packaging(): pass\n")
    (d / "test_broken.py").write_text("import no_such_module_here\n")
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(gc.SCRIPTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--continue-on-collection-errors", "-p", "gpu_check_pytest",
                           "--gpu-check-json", str(out), "--gpu-check-force", "test_kernels.py",
                           "-m", "gpu", str(d)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    got = {t["nodeid"].split("::")[-1]: t for t in data["tests"]}
    assert set(got) == {"test_pass", "test_skip", "test_fail", "test_compiled", "test_marked",
                        "t/test_broken.py"}, "sub/test_kernels.py marks its own: no forcing"
    assert got["t/test_broken.py"]["outcome"] == "error"
    assert "no_such_module_here" in got["t/test_broken.py"]["reason"]
    assert got["test_skip"]["outcome"] == "skipped" and got["test_skip"]["reason"] == "no GPU here"
    assert got["test_fail"]["outcome"] == "failed" and got["test_pass"]["outcome"] == "passed"
    assert got["test_compiled"]["outcome"] == "passed" and got["test_compiled"]["gpu_marked"]
    assert data["finished"] and data["deselected"] == 2 and data["forced_gpu_marker"] == 1
    v = gc.judge_pytest(data, what="GPU tests")
    assert not v.ok and "1 skipped" in v.note and "1 failed" in v.note and "1 error" in v.note


# ---- fact collectors (the GPU-only code paths, against a fake CUDA torch) --------------------

def test_env_facts_with_a_fake_cuda_torch(tmp_path):
    fake = _fake_torch(tmp_path, available=True)
    out = tmp_path / "env.json"
    env = dict(os.environ, PYTHONPATH=str(fake), CUDA_DEVICE_MAX_CONNECTIONS="8",
               NCCL_API_TOKEN="do-not-record")
    proc = subprocess.run([PY, str(SCRIPT), "--facts", "env", "--json", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    f = json.loads(out.read_text())
    assert f["torch"] == "9.9.9+fake" and f["torch_cuda"] == "13.0" and f["nccl"] == "2.27.3"
    assert f["cuda_available"] and f["devices"][0] == {"index": 0, "name": "Fake H200",
                                                        "capability": "9.0", "sm_count": 132,
                                                        "memory_gib": 141.0}
    assert f["stream_priority_range"] == [0, -5] and f["cudnn"] == 91000
    assert f["green_contexts"]["GreenContext"] and "create" in f["green_contexts"]["methods"]
    assert f["cuda_device_max_connections"] == "8" and f["env"]["CUDA_DEVICE_MAX_CONNECTIONS"] == "8"
    assert "NCCL_API_TOKEN" not in f["env"]
    assert "nvcc" in f or "nvcc_error" in f
    errors = {k: v for k, v in f.items() if k.endswith("_error") and k not in (
        "driver_version_error", "triton_error", "nvcc_error")}
    assert not errors, errors
    ctx = _ctx(tmp_path)
    v = gc._judge_env(ctx, gc.StepResult("env", "ok", 0, 1.0, 20.0))
    assert v.ok and "Fake H200, 132 SMs, cc 9.0" in v.note and ctx.env_facts["torch"] == "9.9.9+fake"
    assert json.loads(proc.stdout.strip().splitlines()[-1])["gpu"] == "Fake H200"


def test_build_facts_on_this_machine_are_judged(tmp_path):
    out = tmp_path / "build.json"
    proc = subprocess.run([PY, str(SCRIPT), "--facts", "build", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    f = json.loads(out.read_text())
    assert f["build_info"]["extension"] in ("cpu", "cuda", "none")
    assert "dualpipe" in f["dualpipe_version_output"] and "extension:" in proc.stdout
    ctx = _ctx(tmp_path)
    v = gc._judge_build_info(ctx, gc.StepResult("build-info", "ok", 0, 1.0, 20.0))
    if f["build_info"]["extension"] != "cuda":
        assert not v.ok and "not the CUDA build" in v.note
