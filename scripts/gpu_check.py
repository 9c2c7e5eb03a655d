#!/usr/bin/env python3
"""One prepared GPU check: every GPU claim of the project, time-boxed, in one command.

    python scripts/gpu_check.py [OUT_DIR]          # ./run gpu-check [OUT_DIR] calls this

On a machine without CUDA (torch missing, a CPU-only torch, no NVIDIA device, or
``torch.cuda.is_available()`` False) it prints one line saying so and why and exits 3
at once. Otherwise it runs these steps, each in its own subprocess with a timeout, each
recorded (name, exit code, seconds, tail of its output), going on after a step fails,
all inside a global deadline (default 470 s) that later steps respect:

====================  ====  ==========================================================
step                  s     what it proves
====================  ====  ==========================================================
env                   25    the machine: nvidia-smi, driver, torch/CUDA/NCCL/triton,
                            SMs, stream priorities, torch green-context API, env vars
build                 180   ``bash scripts/setup.sh`` builds ``overlap._C`` for the GPU
                            (fallback while it does not exist: ``setup.py build_ext
                            --inplace`` with TORCH_CUDA_ARCH_LIST = the GPU's arch)
build-info            20    what was built: ``python -m dualpipe --version``, CUDA
                            extension for this arch, ``overlap.kernels`` importable
gpu-tests             120   ``pytest -m gpu tests`` (+ tests/test_kernels.py), Triton
                            compiled (TRITON_INTERPRET unset, DUALPIPE_TRITON_PIN=1);
                            a skipped test fails the step
nccl-dualpipev        40    the NCCL runtime on one GPU, step 0 against a same-device
nccl-1f1b             40    single-process reference (losses bitwise, grads cosine)
sm-partition          45    ``python -m bench.sm_partition``: SM ids each side of an
                            SMPartition reaches, disjointness, budgeted GEMM timings
overlap-bench         60    ``python -m bench.overlap_gpu``: comm SM sweep, software and
                            green-context splits
plan-comm             20    ``python -m dualpipe plan --comm-sms`` on that measurement:
                            the recommendation's communication SM budget
micro-bench           40    ``bench/test_micro.py`` on CUDA (pytest-benchmark)
====================  ====  ==========================================================

Later steps use the interpreter and PYTHONPATH that ``scripts/setup.sh`` prints
(``DUALPIPE_PYTHON=...`` / ``DUALPIPE_PYTHONPATH=...`` lines on stdout).

OUT_DIR (default ``out/gpu-check``) receives at most 8 files: ``summary.md``,
``gpu_check.json`` (every step's record and facts), ``steps.log`` (every step's output),
``gpu_tests.json``, ``sm_partition.json``, ``overlap_gpu.json``, ``plan_comm.json``,
``micro.json``. The summary
table is printed last. Exit status: 0 every step passed, 1 a step failed, 2 bad
arguments, 3 no CUDA here. See docs/gpu_check.md.

The top level imports the standard library only: the check starts on a machine where
nothing is set up yet. ``--facts env|build --json FILE`` is the in-subprocess fact
collector of the ``env`` / ``build-info`` steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent
DEFAULT_OUT = ROOT / "out" / "gpu-check"
MAX_FILES = 8
DEADLINE_S = 470.0          # the whole run, summary included (< 8 minutes)
RESERVE_S = 5.0             # kept back from every step for writing the summary
MIN_STEP_S = 5.0            # a step with less time left than this is skipped
TAIL_CHARS = 3000           # output tail kept per step in gpu_check.json
LOG_HEAD_CHARS = 20_000     # per step in steps.log: this much of the start ...
LOG_TAIL_CHARS = 60_000     # ... and this much of the end
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
SUMMARY_FILES = ("summary.md", "gpu_check.json", "steps.log")  # always written
KERNEL_TEST_FILES = ("test_kernels.py",)  # run compiled on CUDA; counted as GPU tests
MICRO_SELECTION = "gather_rows or scatter_add_rows or sm_copy or persistent_matmul"


# --------------------------------------------------------------------------- records

@dataclasses.dataclass
class Verdict:
    """A step's judgement beyond its exit code."""

    ok: bool
    note: str = ""
    facts: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StepResult:
    """What one step did. ``status``: ``ok``, ``FAIL`` (non-zero exit or a failed
    judgement), ``TIMEOUT``, ``SKIPPED`` (no time left) or ``ERROR`` (could not start)."""

    name: str
    status: str
    rc: Optional[int]
    seconds: float
    timeout_s: float
    note: str = ""
    argv: List[str] = dataclasses.field(default_factory=list)
    tail: str = ""
    facts: dict = dataclasses.field(default_factory=dict)
    files: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclasses.dataclass
class Context:
    """What steps share: where things go, and what earlier steps found out."""

    root: Path
    scratch: Path
    out_dir: Path
    python: str = sys.executable
    pythonpath: Optional[str] = None   # for the GPU steps; None: not set by a build yet
    build_mode: str = ""
    env_facts: dict = dataclasses.field(default_factory=dict)
    results: Dict[str, StepResult] = dataclasses.field(default_factory=dict)

    def path(self, name: str) -> Path:
        return self.scratch / name


@dataclasses.dataclass
class Step:
    """One time-boxed subprocess.

    ``argv(ctx, timeout_s)`` and ``env(ctx)`` are built when the step starts (they may
    depend on earlier steps); ``judge(ctx, result)`` turns its output into a
    :class:`Verdict`; ``artifacts`` maps a result-file name in OUT_DIR to a file the step
    leaves in the scratch directory (copied after the judgement, within the file cap).
    """

    name: str
    budget_s: float
    argv: Callable[[Context, float], List[str]]
    what: str = ""
    env: Optional[Callable[[Context], Dict[str, str]]] = None
    judge: Optional[Callable[[Context, StepResult], Verdict]] = None
    artifacts: Dict[str, str] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- processes

def _kill_group(proc: subprocess.Popen, grace_s: float = 3.0) -> None:
    """SIGTERM the step's process group, SIGKILL what is left after ``grace_s``."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:
            # the leader is gone; children it spawned (ranks, workers) may not be
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            return


def run_process(argv: Sequence[str], env: Dict[str, str], cwd: Path, log_path: Path,
                timeout_s: float) -> Tuple[Optional[int], bool, Optional[str]]:
    """Run ``argv`` in a new session, stdout and stderr into ``log_path``.

    Returns ``(exit code, timed out, error starting it)``. On timeout the whole process
    group is terminated; after a normal exit, what the step left running is killed.
    """
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, cwd=str(cwd),
                                    start_new_session=True)
        except OSError as exc:
            return None, False, f"could not start {argv[0]!r}: {exc}"
        try:
            rc = proc.wait(timeout=max(0.1, timeout_s))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return proc.returncode, True, None
        except BaseException:  # interrupted (SIGTERM/SIGINT): the step must not live on
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
            except (ProcessLookupError, PermissionError, subprocess.TimeoutExpired):
                pass
            raise
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of a finished step
        except (ProcessLookupError, PermissionError):
            pass
        return rc, False, None


def _echo(line: str) -> None:
    print(line, flush=True)  # progress must reach a log even if the run is killed


def tail(text: str, n: int = TAIL_CHARS) -> str:
    return text if len(text) <= n else "[...]\n" + text[-n:]


def _clip_log(text: str) -> str:
    if len(text) <= LOG_HEAD_CHARS + LOG_TAIL_CHARS:
        return text
    cut = len(text) - LOG_HEAD_CHARS - LOG_TAIL_CHARS
    return f"{text[:LOG_HEAD_CHARS]}\n[... {cut} characters cut ...]\n{text[-LOG_TAIL_CHARS:]}"


# --------------------------------------------------------------------------- runner

class Runner:
    """Runs steps in order inside one global deadline; records each; copies result
    files into ``out_dir`` (at most ``max_files`` in all, the summary files included).

    ``deadline_s`` counts from ``t0`` (default: construction). A step gets ``min(budget, time left -
    reserve_s)`` seconds; with less than ``min_step_s`` left it is skipped.
    """

    def __init__(self, ctx: Context, *, deadline_s: float = DEADLINE_S,
                 reserve_s: float = RESERVE_S, min_step_s: float = MIN_STEP_S,
                 max_files: int = MAX_FILES, echo: Callable[[str], None] = _echo,
                 t0: Optional[float] = None) -> None:
        if max_files < len(SUMMARY_FILES):
            raise ValueError(f"max_files must be >= {len(SUMMARY_FILES)} (the summary files)")
        self.ctx = ctx
        self.t0 = time.monotonic() if t0 is None else t0
        self.deadline_s = deadline_s
        self.deadline = self.t0 + deadline_s
        self.reserve_s = reserve_s
        self.min_step_s = min_step_s
        self.max_files = max_files
        self.echo = echo
        self.written: List[str] = []
        self.not_written: List[str] = []
        self.log_parts: List[str] = []

    # ---- files ----------------------------------------------------------------------

    def may_write(self, name: str) -> bool:
        """True if ``name`` fits under the file cap (summary files always do)."""
        if name in self.written or name in SUMMARY_FILES:
            return True
        others = [n for n in self.written if n not in SUMMARY_FILES]
        return len(others) + len(SUMMARY_FILES) < self.max_files

    def _mark_written(self, name: str) -> None:
        if name not in self.written:
            self.written.append(name)

    def collect(self, src: Path, name: str) -> bool:
        """Copy ``src`` to ``out_dir / name`` if it exists and fits under the cap."""
        if not src.is_file():
            return False
        if not self.may_write(name):
            self.not_written.append(f"{name} (over the {self.max_files}-file cap)")
            return False
        self.ctx.out_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.ctx.out_dir / name)
        self._mark_written(name)
        return True

    def write_text(self, name: str, text: str) -> None:
        if not self.may_write(name):
            self.not_written.append(f"{name} (over the {self.max_files}-file cap)")
            return
        self.ctx.out_dir.mkdir(parents=True, exist_ok=True)
        (self.ctx.out_dir / name).write_text(text)
        self._mark_written(name)

    # ---- steps ----------------------------------------------------------------------

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, steps: Sequence[Step], skip: Sequence[str] = ()) -> List[StepResult]:
        out = []
        for step in steps:
            if step.name in skip:
                res = StepResult(step.name, "SKIPPED", None, 0.0, 0.0, note="skipped (--skip)")
                self.ctx.results[step.name] = res
                out.append(res)
                continue
            out.append(self.run_step(step))
        return out

    def run_step(self, step: Step) -> StepResult:
        ctx = self.ctx
        left = self.left() - self.reserve_s
        if left < self.min_step_s:
            res = StepResult(step.name, "SKIPPED", None, 0.0, 0.0,
                             note=f"global deadline: {max(0.0, left):.0f} s left of "
                                  f"{self.deadline_s:.0f} s")
            return self._done(res)
        timeout = min(step.budget_s, left)
        self.echo(f"[gpu-check] {step.name}: up to {timeout:.0f} s ...")
        try:
            argv = [str(a) for a in step.argv(ctx, timeout)]
            env = step.env(ctx) if step.env is not None else step_env(ctx)
        except Exception as exc:  # noqa: BLE001 - a broken step must not stop the others
            res = StepResult(step.name, "ERROR", None, 0.0, timeout,
                             note=f"could not prepare the step: {type(exc).__name__}: {exc}")
            return self._done(res)
        log_path = ctx.path(f"{step.name}.log")
        t0 = time.monotonic()
        rc, timed_out, start_error = run_process(argv, env, ctx.root, log_path, timeout)
        seconds = time.monotonic() - t0
        text = log_path.read_bytes().decode("utf-8", "replace") if log_path.exists() else ""
        if start_error:
            text += start_error
        res = StepResult(step.name, "ok", rc, seconds, timeout, argv=argv, tail=tail(text))
        self.log_parts.append(f"===== {step.name}: rc={rc} {seconds:.1f} s "
                              f"(limit {timeout:.0f} s)\n$ {' '.join(argv)}\n{_clip_log(text)}\n")
        if start_error:
            res.status, res.note = "ERROR", start_error
        elif timed_out:
            res.status, res.note = "TIMEOUT", f"killed after {timeout:.0f} s"
        elif rc != 0:
            res.status, res.note = "FAIL", f"exit code {rc}"
        if step.judge is not None:
            try:
                v = step.judge(ctx, res)
            except Exception as exc:  # noqa: BLE001 - the judgement itself broke
                v = Verdict(False, f"judging the output failed: {type(exc).__name__}: {exc}")
            res.facts.update(v.facts)
            if v.note:
                res.note = f"{res.note}; {v.note}" if res.note else v.note
            if not v.ok and res.status == "ok":
                res.status = "FAIL"
        for name, rel in step.artifacts.items():
            if self.collect(ctx.path(rel), name):
                res.files.append(name)
        return self._done(res)

    def _done(self, res: StepResult) -> StepResult:
        self.ctx.results[res.name] = res
        self.echo(f"[gpu-check] {res.name}: {res.status} ({res.seconds:.1f} s) {res.note}")
        # the record so far, after every step: a run killed later still leaves it
        self.write_record(list(self.ctx.results.values()), final=False)
        return res

    # ---- summary --------------------------------------------------------------------

    started_utc = ""

    def write_record(self, results: Sequence[StepResult], final: bool,
                     interrupted: str = "") -> Tuple[bool, dict]:
        """Write steps.log, gpu_check.json and summary.md for ``results``; ``final=False``
        marks them as a run still going (rewritten after every step)."""
        ok = bool(results) and all(r.ok for r in results) and final and not interrupted
        self.write_text("steps.log", "\n".join(self.log_parts) or "(no step ran)\n")
        device = device_summary(self.ctx.env_facts)
        record = {
            "tool": "scripts/gpu_check.py", "ok": ok, "started_utc": self.started_utc,
            "wall_s": time.monotonic() - self.t0, "deadline_s": self.deadline_s,
            "device": device, "python": self.ctx.python, "pythonpath": self.ctx.pythonpath,
            "build_mode": self.ctx.build_mode, "env": self.ctx.env_facts,
            "steps": [dataclasses.asdict(r) for r in results],
            "finished": final, "interrupted": interrupted or None,
        }
        names = list(dict.fromkeys(self.written + ["gpu_check.json", "summary.md"]))
        record["files"] = names
        record["not_written"] = list(self.not_written)
        self.write_text("gpu_check.json", json.dumps(record, indent=1, default=str) + "\n")
        md = summary_markdown(results, device, ok, names, self.not_written,
                              record["wall_s"], self.ctx)
        if not final:
            md = md.replace("# GPU check (`scripts/gpu_check.py`)",
                            "# GPU check (`scripts/gpu_check.py`) — " +
                            (f"INTERRUPTED ({interrupted})" if interrupted else
                             "in progress (steps so far)"), 1)
        self.write_text("summary.md", md)
        return ok, record

    def finish(self, results: Sequence[StepResult], started_utc: str,
               interrupted: str = "") -> bool:
        """Write the final record; print the table last."""
        self.started_utc = started_utc
        ok, record = self.write_record(results, final=not interrupted, interrupted=interrupted)
        device = record["device"]
        self.echo("")
        self.echo(summary_table(results))
        self.echo(f"[gpu-check] {'PASSED' if ok else 'FAILED'}: "
                  f"{sum(r.ok for r in results)}/{len(results)} steps ok in "
                  f"{record['wall_s']:.0f} s on {device.get('gpu') or 'an unknown GPU'}; "
                  f"results in {self.ctx.out_dir}")
        return ok


def summary_table(results: Sequence[StepResult]) -> str:
    rows = [["step", "status", "rc", "seconds", "note"]]
    rows += [[r.name, r.status, "-" if r.rc is None else str(r.rc), f"{r.seconds:.1f}",
              _one_line(r.note, 300)] for r in results]
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [("  ".join(c.ljust(w[i]) for i, c in enumerate(row[:4])) + "  " + row[4]).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * x for x in w) + "  ----")
    return "\n".join(lines)


def _one_line(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def _num(x, fmt: str) -> str:
    """``format(x, fmt)`` for a number, ``str(x)`` for anything else (None...)."""
    return format(x, fmt) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _md_cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def device_summary(env: dict) -> dict:
    """The few facts that name the machine (for the summary's first lines)."""
    dev = (env.get("devices") or [{}])[0] if isinstance(env.get("devices"), list) else {}
    return {"gpu": dev.get("name"), "capability": dev.get("capability"),
            "sm_count": dev.get("sm_count"), "gpus": env.get("device_count"),
            "driver": env.get("driver_version"), "torch": env.get("torch"),
            "torch_cuda": env.get("torch_cuda"), "nccl": env.get("nccl"),
            "triton": env.get("triton"), "python": env.get("python")}


def summary_markdown(results: Sequence[StepResult], device: dict, ok: bool,
                     files: Sequence[str], not_written: Sequence[str], wall_s: float,
                     ctx: Context) -> str:
    md = ["# GPU check (`scripts/gpu_check.py`)", "",
          f"**{'PASSED' if ok else 'FAILED'}**: {sum(r.ok for r in results)} of "
          f"{len(results)} steps ok in {wall_s:.0f} s.", "",
          f"* Device: {device.get('gpu') or 'unknown'} (compute capability "
          f"{device.get('capability')}, {device.get('sm_count')} SMs; "
          f"{device.get('gpus')} GPU(s) visible), driver {device.get('driver')}",
          f"* torch {device.get('torch')}, CUDA {device.get('torch_cuda')}, NCCL "
          f"{device.get('nccl')}, triton {device.get('triton')}, Python {device.get('python')}",
          f"* Interpreter for the GPU steps: `{ctx.python}`, PYTHONPATH "
          f"`{ctx.pythonpath or ''}`; build: {ctx.build_mode or 'not run'}", "",
          "| step | status | exit | seconds | note |", "|---|---|---:|---:|---|"]
    for r in results:
        md.append(f"| {r.name} | {r.status} | {'-' if r.rc is None else r.rc} | "
                  f"{r.seconds:.1f} | {_md_cell(r.note)} |")
    md += ["", "Files: " + ", ".join(f"`{f}`" for f in files) + "."]
    if not_written:
        md.append("Not written: " + ", ".join(not_written) + ".")
    md += ["", "What each step proves and how to read this: docs/gpu_check.md.", ""]
    return "\n".join(md)


# --------------------------------------------------------------------------- environment

def step_env(ctx: Context, *, pythonpath: bool = True,
             extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment of a GPU step: ours, without TRITON_INTERPRET (kernels compiled),
    with DUALPIPE_TRITON_PIN=1 (no autotuning), a headless matplotlib, unbuffered
    output, and the PYTHONPATH the build reported."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["DUALPIPE_TRITON_PIN"] = "1"
    env["MPLBACKEND"] = "Agg"
    env["PYTHONUNBUFFERED"] = "1"
    if pythonpath:
        # the build's path first, then whatever the caller had (e.g. carried wheels)
        path = ctx.pythonpath if ctx.pythonpath is not None else str(ctx.root)
        joined = os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)
        if joined:
            env["PYTHONPATH"] = joined
        else:
            env.pop("PYTHONPATH", None)
    if extra:
        env.update(extra)
    return env


def _with_scripts(ctx: Context) -> Dict[str, str]:
    """A GPU step's environment with scripts/ on PYTHONPATH (for the pytest plugin)."""
    env = step_env(ctx)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH", "")) if p)
    return env


def _device_arch(ctx: Context) -> Optional[str]:
    devs = ctx.env_facts.get("devices") or []
    return devs[0].get("capability") if devs and isinstance(devs[0], dict) else None


def _has_module(ctx: Context, name: str) -> bool:
    """Whether the step interpreter has ``name``: from the env facts, or (when the env
    step did not finish) asked directly, without importing it."""
    packages = ctx.env_facts.get("packages")
    if packages:
        return bool(packages.get(name))
    try:
        out = subprocess.run([ctx.python, "-c", f"import importlib.util as u; print(u.find_spec({name!r}) is not None)"],
                             capture_output=True, text=True, timeout=15)
        return out.stdout.strip() == "True"
    except (OSError, subprocess.TimeoutExpired):
        return False


def _load_json(path: Path) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------- the steps

def _argv_env(ctx: Context, timeout: float) -> List[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--facts", "env",
            "--json", str(ctx.path("env.json"))]


def _judge_env(ctx: Context, res: StepResult) -> Verdict:
    facts = _load_json(ctx.path("env.json"))
    ctx.env_facts = facts
    dev = device_summary(facts)
    ok = facts.get("cuda_available") is True and (facts.get("device_count") or 0) >= 1
    note = (f"{dev['gpu']}, {dev['sm_count']} SMs, cc {dev['capability']}; torch "
            f"{dev['torch']} (CUDA {dev['torch_cuda']}), NCCL {dev['nccl']}, triton "
            f"{dev['triton']}, driver {dev['driver']}")
    if not ok:
        why = facts.get("cuda_error") or "torch.cuda.is_available() is False"
        note = f"torch sees no CUDA device ({why}); " + note
    return Verdict(ok, note)


def _setup_script(ctx: Context) -> Path:
    return ctx.root / "scripts" / "setup.sh"


def _argv_build(ctx: Context, timeout: float) -> List[str]:
    if _setup_script(ctx).is_file():
        ctx.build_mode = "bash scripts/setup.sh"
        return ["bash", str(_setup_script(ctx))]
    # Fallback until scripts/setup.sh exists: the extension in place, for this GPU's arch.
    ctx.build_mode = (f"fallback: {Path(ctx.python).name} setup.py build_ext --inplace "
                      "(scripts/setup.sh is missing)")
    return [ctx.python, "setup.py", "build_ext", "--inplace"]


def _nvcc_home(ctx: Context) -> Optional[str]:
    """A CUDA_HOME for the fallback build when torch knows none but nvcc was found."""
    nvcc = ctx.env_facts.get("nvcc") or {}
    if nvcc.get("torch_cuda_home") or os.environ.get("CUDA_HOME"):
        return None
    for path in nvcc.get("found") or []:
        return str(Path(path).resolve().parent.parent)
    return None


def _env_build(ctx: Context) -> Dict[str, str]:
    env = step_env(ctx, pythonpath=False)
    env["PYTHON"] = ctx.python
    arch = _device_arch(ctx)
    if arch and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = arch
    elif not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = "9.0"
    if not os.environ.get("MAX_JOBS"):
        env["MAX_JOBS"] = str(os.cpu_count() or 4)
    home = None if _setup_script(ctx).is_file() else _nvcc_home(ctx)
    if home:
        env["CUDA_HOME"] = home
    return env


def parse_setup_output(text: str) -> Dict[str, str]:
    """The last ``DUALPIPE_PYTHON=`` / ``DUALPIPE_PYTHONPATH=`` lines of setup.sh."""
    found: Dict[str, str] = {}
    for line in text.splitlines():
        m = re.match(r"^(DUALPIPE_PYTHON|DUALPIPE_PYTHONPATH)=(.*)$", line.strip("\r"))
        if m:
            found[m.group(1)] = m.group(2).strip()
    return found


def _judge_build(ctx: Context, res: StepResult) -> Verdict:
    log = ctx.path(f"{res.name}.log")
    text = log.read_text(errors="replace") if log.exists() else ""
    built = sorted(p.name for p in (ctx.root / "overlap").glob("_C*.so"))
    facts = {"mode": ctx.build_mode, "in_place_modules": built,
             "torch_cuda_arch_list": _env_build(ctx).get("TORCH_CUDA_ARCH_LIST")}
    if ctx.build_mode.startswith("bash"):
        got = parse_setup_output(text)
        facts.update(got)
        if "DUALPIPE_PYTHON" not in got:
            ctx.pythonpath = str(ctx.root)
            return Verdict(False, "scripts/setup.sh printed no DUALPIPE_PYTHON= line; later "
                                  f"steps use {ctx.python} with PYTHONPATH={ctx.root}", facts)
        ctx.python = got["DUALPIPE_PYTHON"] or ctx.python
        ctx.pythonpath = got.get("DUALPIPE_PYTHONPATH", "")
        return Verdict(res.rc == 0, f"{ctx.build_mode}; python {ctx.python}, PYTHONPATH "
                                    f"'{ctx.pythonpath}'; in place: {built or 'nothing'}", facts)
    installed = _installed_from(ctx)
    ctx.pythonpath = "" if installed == str(ctx.root / "overlap") else str(ctx.root)
    facts["overlap_installed_from"] = installed
    return Verdict(res.rc == 0, f"{ctx.build_mode}; built {built or 'nothing'} for "
                                f"TORCH_CUDA_ARCH_LIST={facts['torch_cuda_arch_list']}; "
                                f"PYTHONPATH '{ctx.pythonpath}'", facts)


def _installed_from(ctx: Context) -> Optional[str]:
    """Where ``ctx.python`` imports ``overlap`` from outside the source tree's directory
    (an editable install of this checkout gives its ``overlap/``); ``None`` if nowhere.
    Importing ``overlap`` loads no torch, so this is quick."""
    code = "import os, overlap; print(os.path.dirname(os.path.abspath(overlap.__file__)))"
    env = step_env(ctx, pythonpath=False)
    env.pop("PYTHONPATH", None)
    try:
        out = subprocess.run([ctx.python, "-c", code], capture_output=True, text=True,
                             timeout=30, cwd=str(ctx.scratch), env=env,
                             stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    return str(Path(lines[-1]).resolve()) if out.returncode == 0 and lines else None


def _argv_build_info(ctx: Context, timeout: float) -> List[str]:
    return [ctx.python, str(Path(__file__).resolve()), "--facts", "build",
            "--json", str(ctx.path("build.json"))]


def arch_matches(capability: Optional[str], archs: Sequence[str]) -> bool:
    """``"9.0"`` against an extension's arch list (``["9.0"]``, ``["9.0a"]``,
    ``["8.0", "9.0+PTX"]``, ``["90"]``...)."""
    if not capability:
        return False
    want = re.sub(r"\D", "", capability)
    return any(re.sub(r"\D", "", re.sub(r"\+PTX$", "", str(a), flags=re.I)) == want
               for a in archs)


def _judge_build_info(ctx: Context, res: StepResult) -> Verdict:
    facts = _load_json(ctx.path("build.json"))
    info = facts.get("build_info") or {}
    arch = _device_arch(ctx)
    problems = []
    if info.get("extension") != "cuda":
        problems.append(f"extension is {info.get('extension')!r}, not the CUDA build "
                        f"({info.get('extension_error')})")
    elif not arch_matches(arch, info.get("cuda_archs") or []):
        problems.append(f"extension built for {info.get('cuda_archs')}, the GPU is {arch}")
    if facts.get("kernels_error"):
        problems.append(f"overlap.kernels: {facts['kernels_error']}")
    elif not facts.get("kernels_has_triton"):
        problems.append(f"triton unusable: {facts.get('kernels_triton_error')}")
    if info.get("triton_interpret"):
        problems.append("TRITON_INTERPRET is set: kernels would be interpreted")
    for name in ("dualpipe", "overlap", "bench"):
        if facts.get(f"{name}_error"):
            problems.append(f"import {name}: {facts[f'{name}_error']}")
    note = (f"extension {info.get('extension')} for {info.get('cuda_archs')}, torch "
            f"{info.get('torch_version')}, triton {info.get('triton_version')}; "
            f"overlap from {facts.get('overlap_file')}")
    if problems:
        note = "; ".join(problems) + "; " + note
    return Verdict(not problems, note, {"build": facts})


def _argv_gpu_tests(ctx: Context, timeout: float) -> List[str]:
    argv = [ctx.python, "-m", "pytest", "-q", "-rsfE", "-m", "gpu",
            "--continue-on-collection-errors", "-p", "no:cacheprovider",
            "-p", "gpu_check_pytest", "--gpu-check-json", str(ctx.path("gpu_tests.json"))]
    for name in KERNEL_TEST_FILES:
        argv += ["--gpu-check-force", name]
    if _has_module(ctx, "pytest_timeout"):
        argv += ["--timeout", str(int(max(10, min(60, timeout / 2))))]
    return argv + gpu_test_files(ctx.root)


def gpu_test_files(root: Path) -> List[str]:
    """The test files that hold gpu-marked tests (and the kernel tests), so collection
    does not import every CPU-only module: a CPU test that cannot import here must not
    fail the GPU step, and collecting the whole suite costs seconds of the window."""
    files = []
    for p in sorted((root / "tests").glob("test_*.py")):
        text = p.read_text(errors="replace")
        if "mark.gpu" in text or p.name in KERNEL_TEST_FILES:
            files.append(str(p.relative_to(root)))
    return files or ["tests"]


def judge_pytest(data: dict, *, what: str) -> Verdict:
    """Pass only when tests ran to the end and none failed, errored or skipped (a skip on
    the GPU machine means a GPU claim went unchecked); the note lists what did not pass.
    ``data``: what scripts/gpu_check_pytest.py wrote."""
    tests = data.get("tests") or []
    by: Dict[str, List[dict]] = {}
    for t in tests:
        by.setdefault(t["outcome"], []).append(t)
    counts = {k: len(v) for k, v in sorted(by.items())}
    bad = [t for k in ("failed", "error", "skipped", "xpassed") for t in by.get(k, [])]
    facts = {"counts": counts, "exitstatus": data.get("exitstatus"),
             "forced_gpu_marker": data.get("forced_gpu_marker"),
             "not_passed": [{"nodeid": t["nodeid"], "outcome": t["outcome"],
                             "reason": _one_line(t.get("reason") or "", 300)} for t in bad]}
    summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no tests ran"
    if not tests:
        return Verdict(False, f"{what}: no tests ran (exit status {data.get('exitstatus')})", facts)
    if not data.get("finished", True):
        bad = bad + [{"nodeid": "(session)", "outcome": "interrupted",
                      "reason": "the run did not finish; results so far"}]
    listed = "; ".join(f"{t['outcome'].upper()} {t['nodeid']}: {_one_line(t.get('reason') or '', 120)}"
                       for t in bad[:6])
    more = f" (+{len(bad) - 6} more)" if len(bad) > 6 else ""
    return Verdict(not bad, f"{what}: {summary}" + (f"; {listed}{more}" if bad else ""), facts)


def _judge_gpu_tests(ctx: Context, res: StepResult) -> Verdict:
    path = ctx.path("gpu_tests.json")
    if not path.is_file():
        return Verdict(False, "the pytest plugin wrote no results")
    return judge_pytest(_load_json(path), what="GPU tests")


def _argv_demo(schedule: str):
    def argv(ctx: Context, timeout: float) -> List[str]:
        return [ctx.python, "-m", "dualpipe", "demo", "--backend", "nccl", "--ranks", "1",
                "--schedule", schedule, "--chunks", "8", "--steps", "10",
                "--timeout", str(int(max(5, min(30, timeout / 2)))),
                "--out", str(ctx.path(f"demo-{schedule}"))]
    return argv


def _env_demo(ctx: Context) -> Dict[str, str]:
    # cuBLAS is bitwise reproducible across streams only with a fixed workspace
    return step_env(ctx, extra={"CUBLAS_WORKSPACE_CONFIG": os.environ.get(
        "CUBLAS_WORKSPACE_CONFIG", ":4096:8")})


def judge_demo_summary(summary: dict) -> Verdict:
    """The demo's step-0 reference check and loss curve, from its summary.json."""
    check = summary.get("first_step_check")
    hist = summary.get("loss_history") or []
    if not check:
        return Verdict(False, "the demo's summary.json has no first_step_check (an old demo "
                              "that did not compare?)", {"summary": summary})
    falling = len(hist) >= 2 and hist[-1] < hist[0]
    ok = bool(check.get("matches")) and falling
    note = (f"reference on {check.get('reference_device')} "
            f"({check.get('reference_device_name')}): losses "
            f"{'bitwise equal' if check.get('losses_bitwise_equal') else 'DIFFER'} "
            f"({check.get('losses_compared')}/{check.get('losses_of')}, max |diff| "
            f"{_num(check.get('loss_max_abs_diff'), '.3g')}), worst grad cosine distance "
            f"{_num(check.get('worst_grad_cosine_distance'), '.2e')} over "
            f"{check.get('grad_tensors_compared')} tensors (tolerance "
            f"{_num(check.get('grad_tolerance'), '.0e')}); loss "
            + (f"{hist[0]:.4f} -> {hist[-1]:.4f} ({'falling' if falling else 'NOT falling'})"
               if hist else "history missing"))
    facts = {"first_step_check": check, "loss_history": hist,
             "stats": summary.get("stats"), "config": summary.get("config")}
    return Verdict(ok, note, facts)


def _judge_demo(schedule: str):
    def judge(ctx: Context, res: StepResult) -> Verdict:
        path = ctx.path(f"demo-{schedule}") / "summary.json"
        if not path.is_file():
            return Verdict(False, f"no {path.name} written")
        return judge_demo_summary(_load_json(path))
    return judge


def _argv_sm_partition(ctx: Context, timeout: float) -> List[str]:
    return [ctx.python, "-m", "bench.sm_partition", "--comm-sms", "8", "16", "24", "32",
            "--m", "8192", "--iters", "10", "--warmup", "2",
            "--max-seconds", f"{max(5.0, timeout - 15):.0f}", "--out", str(ctx.path("smp"))]


#: SMs a green context's work may reach beyond its grant (2 when a module using dynamic
#: parallelism is loaded; see docs/sm_partition.md).
GREEN_CTX_EXTRA_SMS = 2


def judge_sm_partition(data: dict) -> Verdict:
    """Our green-context backend must exist, be disjoint and keep to its grant (up to
    :data:`GREEN_CTX_EXTRA_SMS` extra); other backends are reported, not judged."""
    rows = data.get("rows") or []
    problems, parts = [], []
    by_backend: Dict[str, List[dict]] = {}
    for r in rows:
        by_backend.setdefault(r["backend"], []).append(r)
    for backend, rs in by_backend.items():
        cells = []
        for r in rs:
            k = r["requested_comm_sms"]
            if "unavailable" in r:
                cells.append(f"{k}: unavailable")
                if backend == "green_ctx":
                    problems.append(f"green_ctx comm_sms={k} unavailable: {r['unavailable']}")
                continue
            d, pr = r["partition"], r.get("probe")
            gm = (r.get("gemm_on_compute_side") or {}).get("persistent") or {}
            ratio = gm.get("vs_all_sms")
            cell = f"{k}->{d['comm_sms']}/{d['compute_sms']}"
            if pr is None:
                cell += " probe failed"
            else:
                cell += (f" reached {pr['comm_reached']}/{pr['compute_reached']}, "
                         f"shared {pr['shared']}")
            if ratio is not None:
                cell += f", GEMM x{ratio:.2f}"
            cells.append(cell)
            if backend == "green_ctx":
                if pr is None:
                    problems.append(f"green_ctx comm_sms={k}: no probe result")
                elif not pr["disjoint"]:
                    problems.append(f"green_ctx comm_sms={k}: {pr['shared']} SMs shared")
                elif max(pr["comm_extra"], pr["compute_extra"]) > GREEN_CTX_EXTRA_SMS:
                    problems.append(f"green_ctx comm_sms={k}: reached {pr['comm_reached']}/"
                                    f"{pr['compute_reached']} SMs for {d['comm_sms']}/"
                                    f"{d['compute_sms']} granted")
        parts.append(f"{backend} [{'; '.join(cells)}]")
    if "green_ctx" not in by_backend:
        problems.append("no green_ctx rows")
    if data.get("finished") is False:
        problems.append("the run did not finish (crashed or killed): rows so far")
    for e in data.get("errors") or []:
        problems.append(f"{e['where']}: {_one_line(e['error'], 150)}")
    auto = (data.get("auto") or {}).get("backend")
    note = f"auto picks {auto}; " + " ".join(parts)
    if data.get("truncated"):
        note = "TRUNCATED; " + note
    facts = {"auto": data.get("auto"), "device": data.get("device"),
             "all_sms": data.get("all_sms"), "problems": problems}
    return Verdict(not problems, ("; ".join(problems[:4]) + "; " if problems else "") + note,
                   facts)


def _judge_sm_partition(ctx: Context, res: StepResult) -> Verdict:
    path = ctx.path("smp") / "sm_partition.json"
    if not path.is_file():
        return Verdict(False, "no sm_partition.json written")
    return judge_sm_partition(_load_json(path))


def _argv_overlap(ctx: Context, timeout: float) -> List[str]:
    return [ctx.python, "-m", "bench.overlap_gpu", "--m", "8192", "--comm-mib", "128",
            "--comm-sms", "0", "8", "16", "24", "32", "--iters", "10", "--warmup", "3",
            "--max-seconds", f"{max(5.0, timeout - 20):.0f}", "--out", str(ctx.path("ovl"))]


def judge_overlap(data: dict) -> Verdict:
    rows = data.get("rows") or []
    errors = data.get("errors") or []
    best = data.get("best_split") or {}
    top = sorted(best.items(), key=lambda kv: -kv[1]["overlap_efficiency"])[:4]
    note = (f"{len(rows)} settings over partitions "
            f"{sorted({r['partition'] for r in rows})}"
            + (" (TRUNCATED by --max-seconds)" if data.get("truncated") else "")
            + "; best overlap efficiency: "
            + ", ".join(f"{k} {v['overlap_efficiency']:.2f} at {v['comm_sms']} comm SMs"
                        for k, v in top))
    if data.get("skipped"):
        note += "; skipped: " + "; ".join(f"{k}: {_one_line(v, 80)}"
                                          for k, v in list(data["skipped"].items())[:4])
    if errors:
        note = f"{len(errors)} settings failed (first: {_one_line(errors[0]['error'], 150)}); " + note
    if data.get("finished") is False:
        note = "did not finish (crashed or killed): rows so far; " + note
    facts = {"best_split": best, "skipped": data.get("skipped"),
             "truncated": data.get("truncated"), "rows": len(rows)}
    return Verdict(bool(rows) and not errors and data.get("finished") is not False, note, facts)


def _judge_overlap(ctx: Context, res: StepResult) -> Verdict:
    path = ctx.path("ovl") / "overlap_gpu.json"
    if not path.is_file():
        return Verdict(False, "no overlap_gpu.json written")
    return judge_overlap(_load_json(path))


PLAN_COMM_ARGS = ["plan", "--stage", "examples.plan_stage:make_block", "--no-measure-runtime",
                  "--no-each-micro-batch", "--repeats", "3", "--warmup", "1", "--devices", "8",
                  "--layers", "48", "--global-batch", "512", "--min-micro-batch", "4",
                  "--comm-bytes", "16MiB", "--json"]


def _argv_plan_comm(ctx: Context, timeout: float) -> List[str]:
    """``python -m dualpipe plan --comm-sms`` on overlap-bench's measurement, its JSON
    written to ``plan_comm.json`` (the block is the CPU example: what this step checks
    is that the planner reads this GPU's measurement and prices the budgets)."""
    args = PLAN_COMM_ARGS + ["--comm-sms", str(ctx.path("ovl") / "overlap_gpu.json")]
    # the JSON is written only when the planner printed one (no empty file to collect)
    script = ("import contextlib, io, sys\n"
              "from dualpipe.__main__ import main\n"
              "buf = io.StringIO()\n"
              "with contextlib.redirect_stdout(buf):\n"
              f"    rc = main({args!r})\n"
              "if buf.getvalue().strip():\n"
              f"    open({str(ctx.path('plan_comm.json'))!r}, 'w').write(buf.getvalue())\n"
              "sys.exit(rc)\n")
    return [ctx.python, "-c", script]


def judge_plan_comm(data: dict) -> Verdict:
    rec = data.get("recommendation") or {}
    budget = data.get("comm_budget") or {}
    points = [p.get("comm_sms") for p in budget.get("points") or []]
    if not rec:
        return Verdict(False, f"nothing feasible: {data.get('why_none')}")
    if rec.get("comm_sms") is None:
        return Verdict(False, "the recommendation has no communication SM budget")
    per = {}
    for c in data.get("candidates") or []:
        if c.get("comm_sms") is not None:
            per.setdefault(c["schedule"], c["comm_sms"])  # the best-ranked of each
    note = (f"{rec['schedule']} P={rec['ranks']} N={rec['chunks']} at {rec['comm_sms']} "
            f"comm SMs ({budget.get('kernels')}, measured points {points}); best-ranked per "
            "schedule: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    return Verdict(True, note, {"recommendation_comm_sms": rec["comm_sms"],
                                "points": points, "per_schedule": per})


def _judge_plan_comm(ctx: Context, res: StepResult) -> Verdict:
    if not (ctx.path("ovl") / "overlap_gpu.json").is_file():
        return Verdict(False, "overlap-bench wrote no overlap_gpu.json: nothing to plan with")
    path = ctx.path("plan_comm.json")
    if not path.is_file():
        return Verdict(False, "the planner printed no JSON (its error is in the log tail)")
    return judge_plan_comm(_load_json(path))


def _argv_micro(ctx: Context, timeout: float) -> List[str]:
    return [ctx.python, "-m", "pytest", "-q", "-rsfE", "-p", "no:cacheprovider",
            "-p", "gpu_check_pytest", "--gpu-check-json", str(ctx.path("micro_tests.json")),
            "bench/test_micro.py", "--benchmark-only", "-k", MICRO_SELECTION,
            "--benchmark-json", str(ctx.path("micro_raw.json")),
            "--benchmark-max-time", "0.25", "--benchmark-min-rounds", "5"]


def strip_benchmark_samples(data: dict) -> dict:
    """pytest-benchmark's JSON without the raw per-round samples (the statistics stay)."""
    for b in data.get("benchmarks") or []:
        (b.get("stats") or {}).pop("data", None)
    return data


def judge_micro(tests: dict, bench: dict) -> Verdict:
    benches = bench.get("benchmarks") or []
    names = [b["name"] for b in benches]
    v = judge_pytest(tests, what="micro benchmarks")
    cells = []
    for b in benches:
        med = b["stats"]["median"]
        extra = b.get("extra_info") or {}
        cell = f"{b['name']} {med * 1e6:.1f} us"
        if "tflops" in extra:
            cell += f" ({extra['tflops']:.0f} TFLOP/s)"
        cells.append(cell)
    ok = v.ok and any(n.startswith("test_persistent_matmul") for n in names)
    note = v.note + ("; " + ", ".join(cells) if cells else "; no benchmark recorded")
    if not any(n.startswith("test_persistent_matmul") for n in names):
        note = "the Triton persistent matmul was not timed; " + note
    facts = dict(v.facts)
    facts["medians_us"] = {b["name"]: b["stats"]["median"] * 1e6 for b in benches}
    return Verdict(ok, note, facts)


def _judge_micro(ctx: Context, res: StepResult) -> Verdict:
    tests_path, raw = ctx.path("micro_tests.json"), ctx.path("micro_raw.json")
    if not tests_path.is_file():
        return Verdict(False, "the pytest plugin wrote no results")
    bench = _load_json(raw) if raw.is_file() else {}
    if bench:
        ctx.path("micro.json").write_text(json.dumps(strip_benchmark_samples(bench),
                                                     indent=1) + "\n")
    return judge_micro(_load_json(tests_path), bench)


def default_steps() -> List[Step]:
    """The check, in order of what the window must prove first."""
    return [
        Step("env", 45, _argv_env, judge=_judge_env,
             what="the machine: driver, GPU, SMs, torch/CUDA/NCCL/triton versions, APIs"),
        Step("build", 150, _argv_build, env=_env_build, judge=_judge_build,
             what="the CUDA extension builds for this GPU's arch"),
        Step("build-info", 40, _argv_build_info, judge=_judge_build_info,
             what="what was built: CUDA extension and arch, overlap.kernels with triton"),
        Step("gpu-tests", 120, _argv_gpu_tests, env=_with_scripts, judge=_judge_gpu_tests,
             artifacts={"gpu_tests.json": "gpu_tests.json"},
             what="every GPU test passes on the GPU, none skipped; Triton compiled"),
        Step("nccl-dualpipev", 40, _argv_demo("dualpipev"), env=_env_demo,
             judge=_judge_demo("dualpipev"),
             what="DualPipeV on NCCL, 1 GPU: step 0 equals a same-device reference"),
        Step("nccl-1f1b", 40, _argv_demo("1f1b"), env=_env_demo, judge=_judge_demo("1f1b"),
             what="1F1B on NCCL, 1 GPU: step 0 equals a same-device reference"),
        Step("sm-partition", 45, _argv_sm_partition, judge=_judge_sm_partition,
             artifacts={"sm_partition.json": "smp/sm_partition.json"},
             what="each side of an SMPartition reaches only its SMs; budgeted GEMM cost"),
        Step("overlap-bench", 60, _argv_overlap, judge=_judge_overlap,
             artifacts={"overlap_gpu.json": "ovl/overlap_gpu.json"},
             what="compute/comm overlap per comm SM budget, software and green-context"),
        Step("plan-comm", 20, _argv_plan_comm, env=step_env, judge=_judge_plan_comm,
             artifacts={"plan_comm.json": "plan_comm.json"},
             what="plan --comm-sms prices every candidate at the budgets just measured"),
        Step("micro-bench", 40, _argv_micro, env=_with_scripts, judge=_judge_micro,
             artifacts={"micro.json": "micro.json"},
             what="extension ops and the Triton GEMM timed on CUDA (synchronized)"),
    ]


# --------------------------------------------------------------------------- no CUDA?

def _torch_spec_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def torch_build_cuda(torch_dir: Path) -> Tuple[bool, Optional[str]]:
    """``(known, cuda)`` from ``torch/version.py`` without importing torch (which takes
    seconds): ``cuda`` is ``None`` for a CPU-only build; ``known`` is False when the
    file cannot be read."""
    try:
        text = (torch_dir / "version.py").read_text()
    except OSError:
        return False, None
    m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*(.+?)\s*$", text, re.M)
    if not m:
        return False, None
    value = m.group(1)
    if value == "None":
        return True, None
    return True, value.strip("'\"")


def nvidia_device_visible() -> bool:
    """An NVIDIA device node (or WSL's /dev/dxg) or nvidia-smi exists."""
    if any(Path(p).exists() for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/dxg")):
        return True
    return shutil.which("nvidia-smi") is not None


_PROBE = ("import json, torch\n"
          "ok = torch.cuda.is_available()\n"
          "print(json.dumps({'available': ok, 'count': torch.cuda.device_count() if ok else 0,"
          " 'torch': torch.__version__, 'cuda': torch.version.cuda}))\n")


def cuda_precheck(python: str = sys.executable, *,
                  device_visible: Callable[[], bool] = nvidia_device_visible,
                  env: Optional[Dict[str, str]] = None, timeout_s: float = 60.0,
                  in_process_torch: bool = True) -> Optional[str]:
    """``None`` when CUDA is usable, else one line saying why not.

    Cheap checks first (no torch import): torch importable, a CUDA build of it, an
    NVIDIA device visible; then ``torch.cuda.is_available()`` in a subprocess of
    ``python``. ``in_process_torch``: the first two checks look at this interpreter's
    torch (it is ``python``).
    """
    if in_process_torch:
        torch_dir = _torch_spec_dir()
        if torch_dir is None:
            return (f"no CUDA here: torch is not installed for {python} (install a CUDA "
                    "build of torch, or set PYTHON to an interpreter that has one)")
        known, cuda = torch_build_cuda(torch_dir)
        if known and cuda is None:
            return (f"no CUDA here: the torch at {torch_dir} is a CPU-only build "
                    "(torch.version.cuda is None)")
    if not device_visible():
        return ("no CUDA here: no NVIDIA GPU is visible (no /dev/nvidia* device, no "
                "nvidia-smi on PATH)")
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True,
                             timeout=timeout_s, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"no CUDA here: importing torch and asking for CUDA took over {timeout_s:.0f} s"
    except OSError as exc:
        return f"no CUDA here: could not run {python}: {exc}"
    line = (out.stdout.strip().splitlines() or [""])[-1]
    try:
        facts = json.loads(line)
    except ValueError:
        err = _one_line((out.stderr or out.stdout).strip().splitlines()[-1]
                        if (out.stderr or out.stdout).strip() else f"exit code {out.returncode}", 200)
        return f"no CUDA here: importing torch failed ({err})"
    if not facts.get("available"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return (f"no CUDA here: torch.cuda.is_available() is False (torch {facts.get('torch')}, "
                f"CUDA {facts.get('cuda')}"
                + (f", CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "") + ")")
    return None


# --------------------------------------------------------------------------- facts (run on the GPU)

def _fact(facts: dict, key: str, fn: Callable[[], object]) -> None:
    """``facts[key] = fn()``, or ``facts[key + "_error"]`` with what went wrong."""
    try:
        facts[key] = fn()
    except Exception as exc:  # noqa: BLE001 - every fact on its own
        facts[key + "_error"] = f"{type(exc).__name__}: {exc}"


def _run_text(argv: Sequence[str], timeout: float = 15.0) -> str:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                         stdin=subprocess.DEVNULL)
    text = (out.stdout or "") + (out.stderr or "")
    if out.returncode != 0:
        raise RuntimeError(f"exit code {out.returncode}: {_one_line(text, 300)}")
    return text


def _driver_version() -> str:
    import ctypes
    lib = ctypes.CDLL("libcuda.so.1")
    v = ctypes.c_int(0)
    if lib.cuDriverGetVersion(ctypes.byref(v)) != 0:
        raise RuntimeError("cuDriverGetVersion failed")
    return f"{v.value // 1000}.{(v.value % 1000) // 10}"


def _nvcc_facts() -> dict:
    import torch.utils.cpp_extension as ce
    cands = []
    for d in (os.environ.get("CUDA_HOME"), ce.CUDA_HOME, "/usr/local/cuda"):
        if d:
            cands.append(os.path.join(d, "bin", "nvcc"))
    which = shutil.which("nvcc")
    if which:
        cands.append(which)
    for site in sys.path:
        nv = Path(site) / "nvidia"
        if nv.is_dir():
            cands += [str(p) for p in nv.glob("*/bin/nvcc")]
    found = list(dict.fromkeys(c for c in cands if os.path.isfile(c) and os.access(c, os.X_OK)))
    facts: dict = {"torch_cuda_home": ce.CUDA_HOME, "found": found}
    if found:
        _fact(facts, "version", lambda: _run_text([found[0], "--version"]).strip().splitlines()[-1])
    return facts


def _relevant_env() -> Dict[str, str]:
    """The environment variables that change what CUDA, NCCL, torch and Triton do (never
    one whose name suggests a credential)."""
    prefixes = ("CUDA_", "NCCL_", "TORCH_", "TRITON_", "DUALPIPE_", "CUBLAS_", "PYTORCH_")
    names = ("PYTHONPATH", "MAX_JOBS", "OMP_NUM_THREADS", "NVIDIA_VISIBLE_DEVICES",
             "NVIDIA_DRIVER_CAPABILITIES", "LD_LIBRARY_PATH")
    secret = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL|AUTH", re.I)
    return {k: v for k, v in sorted(os.environ.items())
            if (k.startswith(prefixes) or k in names) and not secret.search(k)}


def collect_env_facts() -> dict:
    """Everything about the machine the GPU steps depend on (runs in the ``env`` step)."""
    import importlib.metadata as md
    facts: dict = {"python": platform.python_version(), "executable": sys.executable,
                   "platform": platform.platform(), "cpu_count": os.cpu_count(),
                   "env": _relevant_env()}
    facts["cuda_device_max_connections"] = os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")
    pkgs = {}
    for name, dist in (("torch", "torch"), ("triton", "triton"), ("pytest", "pytest"),
                       ("pytest_benchmark", "pytest-benchmark"),
                       ("pytest_timeout", "pytest-timeout"), ("hypothesis", "hypothesis"),
                       ("matplotlib", "matplotlib"), ("numpy", "numpy"), ("ninja", "ninja"),
                       ("setuptools", "setuptools"), ("pip", "pip")):
        if importlib.util.find_spec(name) is None:
            pkgs[name] = None
            continue
        try:
            pkgs[name] = md.version(dist)
        except md.PackageNotFoundError:
            pkgs[name] = "importable"
    facts["packages"] = pkgs
    for tool, argv in (("nvidia_smi", ["nvidia-smi"]),
                       ("nvidia_smi_query", ["nvidia-smi", "--query-gpu=index,name,driver_version,"
                                             "memory.total,clocks.max.sm,compute_mode,"
                                             "mig.mode.current", "--format=csv"]),
                       ("gcc", ["gcc", "--version"]), ("cxx", ["c++", "--version"]),
                       ("ninja_version", ["ninja", "--version"])):
        if shutil.which(argv[0]) is None:
            facts[tool] = None
            continue
        _fact(facts, tool, lambda argv=argv: _run_text(argv)[:4000].rstrip())
    _fact(facts, "driver_version", _driver_version)
    import torch
    facts["torch"] = torch.__version__
    facts["torch_cuda"] = torch.version.cuda
    facts["torch_git"] = getattr(torch.version, "git_version", None)
    _fact(facts, "cudnn", lambda: torch.backends.cudnn.version())
    def nccl_version():
        v = torch.cuda.nccl.version()
        return ".".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)
    _fact(facts, "nccl", nccl_version)
    _fact(facts, "nccl_available", lambda: torch.distributed.is_nccl_available())
    _fact(facts, "triton", lambda: __import__("triton").__version__)
    try:
        facts["cuda_available"] = bool(torch.cuda.is_available())
        facts["device_count"] = torch.cuda.device_count()
    except Exception as exc:  # noqa: BLE001
        facts["cuda_available"], facts["device_count"] = False, 0
        facts["cuda_error"] = f"{type(exc).__name__}: {exc}"
    if facts["cuda_available"]:
        devices = []
        for i in range(facts["device_count"]):
            p = torch.cuda.get_device_properties(i)
            devices.append({"index": i, "name": p.name, "capability": f"{p.major}.{p.minor}",
                            "sm_count": p.multi_processor_count,
                            "memory_gib": round(p.total_memory / 2 ** 30, 1)})
        facts["devices"] = devices
        _fact(facts, "stream_priority_range",
              lambda: list(torch.cuda.Stream.priority_range()))
        _fact(facts, "arch_list", lambda: torch.cuda.get_arch_list())
    gc = getattr(torch.cuda, "green_contexts", None)
    green: dict = {"module": gc is not None}
    if gc is not None:
        green["supported"] = getattr(gc, "SUPPORTED", None)
        cls = getattr(gc, "GreenContext", None)
        green["GreenContext"] = cls is not None
        if cls is not None:
            green["methods"] = sorted(n for n in dir(cls) if not n.startswith("_"))
        green["module_names"] = sorted(n for n in dir(gc) if not n.startswith("_"))
    facts["green_contexts"] = green
    _fact(facts, "nvcc", _nvcc_facts)
    return facts


def collect_build_facts() -> dict:
    """What the build produced, from the interpreter and PYTHONPATH later steps use."""
    # the steps run ``python -m ...`` (and pytest) from the repository root, which puts it
    # first on sys.path; import from where they will
    sys.path.insert(0, os.getcwd())
    facts: dict = {"python": sys.executable, "pythonpath": os.environ.get("PYTHONPATH"),
                   "cwd": os.getcwd()}
    for name in ("dualpipe", "overlap", "bench"):
        try:
            mod = __import__(name)
            facts[f"{name}_file"] = getattr(mod, "__file__", None)
        except Exception as exc:  # noqa: BLE001
            facts[f"{name}_error"] = f"{type(exc).__name__}: {exc}"
    if "overlap_error" not in facts:
        _fact(facts, "build_info", lambda: __import__("overlap").build_info())
        try:
            import overlap.kernels as K
            facts["kernels_file"] = K.__file__
            facts["kernels_has_triton"] = bool(K.HAS_TRITON)
            facts["kernels_triton_error"] = K.TRITON_ERROR
            facts["kernels_interpreting"] = bool(K.interpreting())
        except Exception as exc:  # noqa: BLE001
            facts["kernels_error"] = f"{type(exc).__name__}: {exc}"
    _fact(facts, "dualpipe_version_output",
          lambda: _run_text([sys.executable, "-m", "dualpipe", "--version"], timeout=30))
    print(facts.get("dualpipe_version_output") or facts.get("dualpipe_version_output_error"))
    return facts


def _facts_main(kind: str, path: str) -> int:
    facts = collect_env_facts() if kind == "env" else collect_build_facts()
    with open(path, "w") as f:
        json.dump(facts, f, indent=1, default=str)
        f.write("\n")
    if kind == "env":
        print(json.dumps(device_summary(facts)))
    return 0


# --------------------------------------------------------------------------- main

def _clear_previous(out_dir: Path, steps: Sequence[Step]) -> List[str]:
    """Remove result files a previous run left in ``out_dir``; return the names of other
    files there (left alone, reported)."""
    ours = set(SUMMARY_FILES) | {n for s in steps for n in s.artifacts}
    foreign = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            if p.name in ours and p.is_file():
                p.unlink()
            else:
                foreign.append(p.name)
    return foreign


class _Interrupted(Exception):
    """SIGTERM/SIGINT arrived: the running step is killed and the record written."""


def run_check(out_dir: Path, steps: Sequence[Step], *, deadline_s: float = DEADLINE_S,
              skip: Sequence[str] = (), keep_scratch: bool = False,
              echo: Callable[[str], None] = None, **runner_kw) -> Tuple[bool, Runner]:
    """Run ``steps`` and write the results into ``out_dir``; returns ``(all ok, runner)``."""
    if echo is None:
        echo = _echo
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    foreign = _clear_previous(out_dir, steps)
    scratch = Path(tempfile.mkdtemp(prefix="dualpipe-gpu-check-"))
    ctx = Context(root=ROOT, scratch=scratch, out_dir=out_dir)
    runner = Runner(ctx, deadline_s=deadline_s, echo=echo, **runner_kw)
    if foreign:
        runner.not_written.append(f"(OUT_DIR also holds {len(foreign)} files of something "
                                  f"else, left alone: {', '.join(sorted(foreign)[:5])})")
    runner.started_utc = started

    def stop(signum, _frame):
        raise _Interrupted(signal.Signals(signum).name)

    old_handlers = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            old_handlers[sig] = signal.signal(sig, stop)
        except ValueError:  # not the main thread (tests): no handler
            pass
    try:
        try:
            results = runner.run(steps, skip=skip)
            ok = runner.finish(results, started)
        except _Interrupted as e:
            ok = runner.finish(list(ctx.results.values()), started, interrupted=str(e))
    finally:
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if keep_scratch:
            echo(f"[gpu-check] scratch kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return ok, runner


def main(argv: Optional[Sequence[str]] = None) -> int:
    t0 = time.monotonic()  # the deadline counts the CUDA pre-check too
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py",
                                description="One time-boxed GPU check (docs/gpu_check.md).")
    p.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT),
                   help=f"where the result files go (default {DEFAULT_OUT.relative_to(ROOT)})")
    p.add_argument("--deadline-s", type=float, default=DEADLINE_S,
                   help="seconds for the whole run; later steps get what is left")
    p.add_argument("--skip", action="append", default=[], metavar="STEP",
                   help="leave out a step (repeatable): " + ", ".join(s.name for s in default_steps()))
    p.add_argument("--keep-scratch", action="store_true",
                   help="keep the scratch directory (full outputs of every step)")
    p.add_argument("--facts", choices=["env", "build"], help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.facts:
        if not a.json:
            p.error("--facts needs --json FILE")
        return _facts_main(a.facts, a.json)
    steps = default_steps()
    unknown = sorted(set(a.skip) - {s.name for s in steps})
    if unknown:
        p.error(f"unknown step(s) {unknown}; steps are {[s.name for s in steps]}")
    reason = cuda_precheck(sys.executable)
    if reason:
        print(f"gpu-check: {reason}", file=sys.stderr)
        return EXIT_NO_CUDA
    ok, _ = run_check(Path(a.out_dir).resolve(), steps, deadline_s=a.deadline_s,
                      skip=a.skip, keep_scratch=a.keep_scratch, t0=t0)
    return EXIT_OK if ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
