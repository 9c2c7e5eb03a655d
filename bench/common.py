"""Shared pieces of the benchmarks: machine description, statistics, result files,
calibrated sleep stages and the per-rank wiring of a schedule's inputs and labels.

Nothing here asserts a speed: benchmarks report what they measured (ratios against a
baseline measured in the same run) and fail loudly when something did not run.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# their home is dualpipe.launch (the planner's --verify times the runtime with them too)
from dualpipe.launch import makespans, timed  # noqa: F401 - re-exported

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- machine

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backend: str, **extra: Any) -> dict:
    """What the numbers were measured on (goes into every JSON result)."""
    import torch
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "mem_gib": _mem_gib(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "backend": backend,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # DUALPIPE_BENCH_COMMIT / _NOTE describe the source when the benchmarks run from
        # an exported tree (``git archive``), e.g. while the checkout has edits in progress
        "git_commit": os.environ.get("DUALPIPE_BENCH_COMMIT") or _git_commit(),
        "runtime_modified_since_commit": ([] if os.environ.get("DUALPIPE_BENCH_COMMIT")
                                          else _runtime_dirty()),
        "source_note": os.environ.get("DUALPIPE_BENCH_NOTE"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info.update(extra)
    return info


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def _runtime_dirty() -> list[str] | None:
    """Files of dualpipe/ and overlap/ that differ from the commit (what was measured is
    the working tree)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                              "dualpipe", "overlap"], capture_output=True, text=True, timeout=10)
        return [line[3:] for line in out.stdout.splitlines() if line.strip()]
    except Exception:  # noqa: BLE001
        return None


def describe_machine(m: dict) -> str:
    """One line for tables and logs."""
    dev = m["gpu"] or f"{m['cpu_model']}, {m['cpu_cores_usable']} cores"
    return (f"{dev}; torch {m['torch']}; backend {m['backend']}; load avg "
            f"{m['load_avg_1_5_15'][0]} at start")


# --------------------------------------------------------------------------- statistics

def summarize(xs: Sequence[float]) -> dict:
    """median, quartiles, IQR, min, max, mean, n of ``xs`` (no NaN: raises when empty)."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        raise ValueError("no samples to summarize: the benchmark did not run")
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": xs[0], "max": xs[-1], "mean": statistics.fmean(xs), "n": len(xs)}


def ratio_samples(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repeat ratios a[i] / b[i] (the two sides measured back to back)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return [x / y for x, y in zip(a, b)]


# --------------------------------------------------------------------------- output

def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)
    out = ["| " + " | ".join(headers) + " |",
           "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(v) for v in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r))
             for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def out_dir(path: str | os.PathLike | None) -> Path:
    d = Path(path) if path else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d


def write_json(path: Path, payload: dict) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__dict__"):
        return o.__dict__
    return str(o)


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, axes[0]


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- stages

_cuda_cycles_per_s: float | None = None


def cuda_sleep_cycles_per_s() -> float:
    """Clock cycles per second of ``torch.cuda._sleep`` on the current GPU (measured once)."""
    global _cuda_cycles_per_s
    if _cuda_cycles_per_s is None:
        import torch
        cycles = 50_000_000
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        _cuda_cycles_per_s = cycles / (a.elapsed_time(b) / 1e3)
    return _cuda_cycles_per_s


_sleep_bias = 0.0


def calibrate_host_sleep(seconds: float = 0.005, samples: int = 20) -> float:
    """Measure how much later than asked ``time.sleep`` returns on this machine now
    (median over ``samples``), and make :func:`sleep_for` ask for that much less, so a
    calibrated action costs its nominal time.  Returns the bias in seconds."""
    global _sleep_bias
    over = []
    for _ in range(samples):
        t0 = time.perf_counter()
        time.sleep(seconds)
        over.append(time.perf_counter() - t0 - seconds)
    over.sort()
    _sleep_bias = max(0.0, over[len(over) // 2])
    return _sleep_bias


def sleep_for(seconds: float, device) -> None:
    """Occupy ``device`` for ``seconds``: the host sleeps on CPU (so many ranks share few
    cores; less the bias measured by :func:`calibrate_host_sleep`), ``torch.cuda._sleep``
    spins the GPU on CUDA."""
    if seconds <= 0:
        return
    if getattr(device, "type", "cpu") == "cuda":
        import torch
        torch.cuda._sleep(int(seconds * cuda_sleep_cycles_per_s()))
    else:
        time.sleep(max(0.0, seconds - _sleep_bias))


def _sleep_functions():
    import torch

    from dualpipe import WeightGradStore

    class SleepInput(torch.autograd.Function):
        """Input path of a calibrated layer: forward costs ``f``, backward ``b - w``."""

        @staticmethod
        def forward(ctx, x, f, b_in):
            ctx.b_in = b_in
            sleep_for(f, x.device)
            return x.clone()

        @staticmethod
        def backward(ctx, gy):
            sleep_for(ctx.b_in, gy.device)
            return gy, None, None

    class SleepWeight(torch.autograd.Function):
        """Weight path of a calibrated layer: its gradient costs ``w``.  When
        ``WeightGradStore.enabled`` (our runtime's ``I`` actions) the cost and the
        accumulation are deferred to a closure that the ``W`` action runs."""

        @staticmethod
        def forward(ctx, weight, w):
            ctx.w = w
            ctx.weight = weight
            return weight.clone()

        @staticmethod
        def backward(ctx, gw):
            w, weight = ctx.w, ctx.weight
            if WeightGradStore.enabled:
                def deferred():
                    sleep_for(w, gw.device)
                    with torch.no_grad():
                        weight.grad = gw.clone() if weight.grad is None else weight.grad + gw
                WeightGradStore.put(deferred)
                return None, None
            sleep_for(w, gw.device)
            return gw, None

    return SleepInput, SleepWeight


_FNS = None


def sleep_layer_class():
    """``SleepLayer(dim, f, b, w)``: ``y = x + weight`` whose forward costs ``f``
    seconds and backward ``b`` (``b - w`` on the input path, ``w`` on the weight path).

    The two paths are separate autograd nodes, so every runtime splits the backward the
    way it would split a real layer's: ``torch.distributed.pipelining`` computes the
    input gradient first (``b - w``) and the weight gradient later from the saved
    intermediate (``w``); our runtime defers the weight path through
    ``dualpipe.WeightGradStore``.  A first stage's input gets ``requires_grad`` inside
    the layer so its input path costs the same as everywhere else.
    """
    global _FNS
    import torch
    import torch.nn as nn
    if _FNS is None:
        _FNS = _sleep_functions()
    SleepInput, SleepWeight = _FNS

    class SleepLayer(nn.Module):
        def __init__(self, dim: int, f: float, b: float, w: float):
            super().__init__()
            if not 0 <= w <= b:
                raise ValueError(f"need 0 <= w <= b, got b={b}, w={w}")
            self.f, self.b_in, self.w = float(f), float(b - w), float(w)
            self.weight = nn.Parameter(torch.zeros(dim))

        def forward(self, x):
            if torch.is_grad_enabled() and not x.requires_grad:
                x = x.detach().requires_grad_(True)
            return SleepInput.apply(x, self.f, self.b_in) + SleepWeight.apply(self.weight, self.w)

    return SleepLayer


def sleep_stage(layers: int, dim: int, f: float, b: float, w: float):
    """A stage of ``layers`` calibrated layers (costs add up)."""
    import torch.nn as nn
    cls = sleep_layer_class()
    if layers == 1:
        return cls(dim, f, b, w)
    return nn.Sequential(*[cls(dim, f, b, w) for _ in range(layers)])


def mlp_stage(layers: int, dim: int, seed: int):
    """A stage of ``layers`` residual MLP blocks (LayerNorm, Linear d->4d, GELU, Linear
    4d->d), deterministic weights from ``seed``."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(dim)
            self.fc1 = nn.Linear(dim, 4 * dim)
            self.fc2 = nn.Linear(4 * dim, dim)

        def forward(self, x):
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))

    torch.manual_seed(seed)
    blocks = [Block() for _ in range(layers)]
    return blocks[0] if layers == 1 else nn.Sequential(*blocks)


def mse(out, target):
    import torch.nn.functional as Fn
    return Fn.mse_loss(out, target)


# --------------------------------------------------------------------------- our pipelines

def build_ours(name: str, rank: int, world: int, num_chunks: int,
               make_stage: Callable[[int], Any], **kw):
    """Our pipeline for ``name`` on this rank, with ``make_stage(stage_index)`` for each of
    the rank's stages (placement from the schedule).  Returns ``(pipe, schedule)``."""
    from dualpipe import Pipeline
    from dualpipe.schedules import get_schedule
    s = get_schedule(name, world, num_chunks)
    mods = [make_stage(stage) for (_st, stage) in s.placement[rank]]
    return Pipeline(mods, schedule=name, **kw), s


def rank_io(s, rank: int, x, y, rows_per_mb: int):
    """This rank's share of the batch for our runtime: inputs where it holds a stream's
    first stage, labels where it holds a last stage (``x``/``y`` cover all micro-batches)."""
    ins, outs = s.input_microbatches(rank), s.loss_microbatches(rank)
    inputs = () if ins is None else (x[ins.start * rows_per_mb:ins.stop * rows_per_mb],)
    labels = () if outs is None else (y[outs.start * rows_per_mb:outs.stop * rows_per_mb],)
    return inputs, labels


def torch_pipelining_status() -> dict:
    """Which of torch.distributed.pipelining's schedules this torch has."""
    import torch
    out = {"torch": torch.__version__, "Schedule1F1B": False, "ScheduleDualPipeV": False,
           "reason": None}
    try:
        from torch.distributed.pipelining import schedules as sch
    except Exception as e:  # noqa: BLE001
        out["reason"] = f"torch.distributed.pipelining is not importable: {e}"
        return out
    out["Schedule1F1B"] = hasattr(sch, "Schedule1F1B")
    out["ScheduleDualPipeV"] = hasattr(sch, "ScheduleDualPipeV")
    if not out["ScheduleDualPipeV"]:
        out["reason"] = (f"torch {torch.__version__} has no ScheduleDualPipeV (added in torch "
                         "2.8); the DualPipeV comparison is skipped")
    return out


# --------------------------------------------------------------------------- wait probes

def ours_wait_probe() -> list[float]:
    """Accumulate the time this process spends in ``overlap.p2p.Handle.wait`` and
    ``overlap.shm.ShmHandle.wait`` -- every wait our runtime does on a transfer
    (receives, the step handshake, the send drain at the end of a step), whichever
    transport carries it.  Returns a one-element list holding seconds (read deltas)."""
    from overlap import p2p, shm
    if getattr(p2p.Handle.wait, "_bench_wrapped", False):
        return p2p.Handle.wait._bench_acc
    acc = [0.0]
    for cls in (p2p.Handle, shm.ShmHandle):
        orig = cls.wait

        def wait(self, *args, _orig=orig, **kwargs):
            if self.done:
                return self.tensors
            t0 = time.perf_counter()
            try:
                return _orig(self, *args, **kwargs)
            finally:
                acc[0] += time.perf_counter() - t0
        wait._bench_wrapped = True
        wait._bench_acc = acc
        cls.wait = wait
    return acc


def torch_wait_probe() -> list[float]:
    """Accumulate the time torch.distributed.pipelining's schedules spend in
    ``schedules._wait_batch_p2p`` (where they wait on every p2p work).  Returns a
    one-element list holding seconds."""
    from torch.distributed.pipelining import schedules as sch
    orig = getattr(sch, "_wait_batch_p2p", None)
    if orig is None:
        return [0.0]
    if getattr(orig, "_bench_wrapped", False):
        return orig._bench_acc
    acc = [0.0]

    def wrapped(work):
        t0 = time.perf_counter()
        try:
            return orig(work)
        finally:
            acc[0] += time.perf_counter() - t0
    wrapped._bench_wrapped = True
    wrapped._bench_acc = acc
    sch._wait_batch_p2p = wrapped
    return acc


def torch_busy_probe() -> list[float]:
    """Accumulate the time torch.distributed.pipelining spends inside its compute
    actions (``forward_one_chunk``, ``backward_one_chunk``, ``backward_weight_one_chunk``
    of every stage, and the loss), the counterpart of our ``last_stats.busy``.  Returns a
    one-element list holding seconds."""
    try:
        from torch.distributed.pipelining import schedules as sch
        from torch.distributed.pipelining import stage as stg
        base = stg._PipelineStageBase
    except (ImportError, AttributeError):  # another torch layout: report no split
        return [0.0]
    if getattr(base, "_bench_busy", None) is not None:
        return base._bench_busy
    acc = [0.0]
    depth = [0]

    def wrap(owner, name):
        orig = getattr(owner, name, None)
        if orig is None:
            return

        def timed_call(*args, **kwargs):
            if depth[0]:
                return orig(*args, **kwargs)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                acc[0] += time.perf_counter() - t0
                depth[0] -= 1
        setattr(owner, name, timed_call)

    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        wrap(base, name)
    wrap(sch._PipelineSchedule, "_maybe_compute_loss")
    base._bench_busy = acc
    return acc


def ours_post_probe() -> dict:
    """Accumulate the time spent *posting* transfers (``isend`` / ``irecv`` of
    ``overlap.p2p.P2P`` and ``overlap.shm.ShmP2P``: the call that enqueues them; on
    shared memory a send usually completes inside it).  Our runtime posts sends inside
    compute actions (right after the producing compute) and receives outside them.
    Returns ``{"send": s, "recv": s}`` (read deltas)."""
    from overlap import p2p, shm
    if getattr(p2p.P2P, "_bench_post", None) is not None:
        return p2p.P2P._bench_post
    acc = {"send": 0.0, "recv": 0.0}

    def wrap(cls, name, key):
        orig = getattr(cls, name)

        def posted(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                acc[key] += time.perf_counter() - t0
        setattr(cls, name, posted)
    for cls in (p2p.P2P, shm.ShmP2P):
        wrap(cls, "isend", "send")
        wrap(cls, "irecv", "recv")
    p2p.P2P._bench_post = acc
    return acc


def torch_post_probe() -> list[float]:
    """Accumulate the time torch.distributed.pipelining spends posting p2p operations
    (``schedules._batch_p2p``).  Returns a one-element list holding seconds."""
    from torch.distributed.pipelining import schedules as sch
    orig = getattr(sch, "_batch_p2p", None)
    if orig is None:
        return [0.0]
    if getattr(orig, "_bench_wrapped", False):
        return orig._bench_acc
    acc = [0.0]

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0
    wrapped._bench_wrapped = True
    wrapped._bench_acc = acc
    sch._batch_p2p = wrapped
    return acc
