"""Micro benchmarks (pytest-benchmark).  Not part of ``./run test`` (which runs ``tests/``):

    .venv/bin/python -m pytest bench/ --benchmark-only
    .venv/bin/python -m pytest bench/ --benchmark-only --benchmark-json bench/results/micro.json

* schedule generation, lowering (sends/receives) and validation for 8 x 20 and 16 x 64;
* the simulator;
* one rank's whole step in a single process (DualPipeV and 1F1B on a 1-rank gloo group,
  ``nn.Linear(4, 4)`` stages): the runtime's per-action path without a peer, reported per
  compute action in ``extra_info``;
* the extension's data-movement ops against their pure-torch fallbacks (CPU build or
  CUDA), the Triton kernels on CUDA only (under the CPU interpreter a timing means nothing).

On CUDA every timed call ends with ``torch.cuda.synchronize()`` (:func:`_on_device`):
kernel launches are asynchronous, so without it the host clock would time the launch,
not the kernel. The figure then includes one synchronization (a few microseconds);
``extra_info["timing"]`` says which way a benchmark was timed.
"""
from __future__ import annotations

import dataclasses
import datetime

import pytest
import torch

from dualpipe.schedules import SCHEDULES, lower
from dualpipe.simulate import Costs, simulate
from dualpipe.validate import validate

SIZES = [(8, 20), (16, 64)]
NAMES = sorted(SCHEDULES)
CASES = [pytest.param(n, r, c, id=f"{n}-{r}x{c}") for n in NAMES for (r, c) in SIZES]


@pytest.mark.parametrize("name,ranks,chunks", CASES)
def test_generate(benchmark, name, ranks, chunks):
    s = benchmark(SCHEDULES[name], ranks, chunks)
    benchmark.extra_info["actions"] = sum(len(a) for a in s.actions)


@pytest.mark.parametrize("name,ranks,chunks", CASES)
def test_lower(benchmark, name, ranks, chunks):
    s = SCHEDULES[name](ranks, chunks)
    # a copy of the schedule has no lowering cached yet: this times the pass itself
    low = benchmark(lambda: lower(dataclasses.replace(s)))
    benchmark.extra_info["actions_with_comm"] = sum(len(a) for a in low)


@pytest.mark.parametrize("name,ranks,chunks", CASES)
def test_validate(benchmark, name, ranks, chunks):
    s = SCHEDULES[name](ranks, chunks)
    benchmark(validate, s)


@pytest.mark.parametrize("name,ranks,chunks", CASES)
def test_generate_lower_validate(benchmark, name, ranks, chunks):
    def all_three():
        s = SCHEDULES[name](ranks, chunks)
        validate(s)  # lowers s (and caches it on s)
        return lower(s)
    benchmark(all_three)


@pytest.mark.parametrize("name,ranks,chunks", CASES)
def test_simulate(benchmark, name, ranks, chunks):
    s = SCHEDULES[name](ranks, chunks)
    res = benchmark(simulate, s, Costs(1.0, 2.0, 1.0, fb=2.5, latency=0.1))
    benchmark.extra_info["makespan"] = res.makespan


# ----------------------------------------------------------------- one rank, one process

@pytest.fixture(scope="module")
def one_rank_group():
    import torch.distributed as dist

    from dualpipe.launch import free_port
    if dist.is_initialized():
        pytest.skip("torch.distributed is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, timeout=datetime.timedelta(seconds=60))
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("name,split", [("dualpipev", True), ("dualpipev", False),
                                        ("1f1b", False), ("zb1p", True)])
def test_step_one_rank(benchmark, one_rank_group, name, split):
    from dualpipe import DualPipeV, Pipeline
    from dualpipe.schedules import get_schedule
    torch.set_num_threads(1)
    N = 16
    s = get_schedule(name, 1, N)
    mods = [torch.nn.Linear(4, 4) for _ in s.placement[0]]
    if name == "dualpipev":
        pipe = DualPipeV(mods, split_linear_weight_grads=split)
    else:
        pipe = Pipeline(mods[0], schedule=name, split_linear_weight_grads=split)
    x, y = torch.randn(N, 4), torch.randn(N, 4)

    def step():
        pipe.zero_grad(set_to_none=True)
        pipe.step(x, num_chunks=N, criterion=torch.nn.functional.mse_loss, labels=(y,))
    step()
    benchmark(step)
    parts = sum(len(a.parts()) for a in s.actions[0])
    benchmark.extra_info["compute_actions"] = parts
    benchmark.extra_info["us_per_action_median"] = benchmark.stats.stats.median / parts * 1e6


# ----------------------------------------------------------------- extension and kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _on_device(benchmark, fn):
    """``fn`` as timed: on CUDA followed by a device synchronize (the host clock then sees
    the kernel, not only its launch); recorded in ``extra_info["timing"]``."""
    if DEVICE != "cuda":
        benchmark.extra_info["timing"] = "host clock (CPU)"
        return fn

    def synced():
        out = fn()
        torch.cuda.synchronize()
        return out
    benchmark.extra_info["timing"] = "host clock, torch.cuda.synchronize() after each call"
    benchmark.extra_info["gpu"] = torch.cuda.get_device_name(0)
    synced()  # warm-up outside the timing: first launches load kernels / allocate
    return synced


def _ext_or_skip():
    from overlap._ext import extension_available, extension_error
    if not extension_available():
        pytest.skip(f"the compiled extension is not loaded: {extension_error()}")


@pytest.mark.parametrize("use_ext", [True, False], ids=["extension", "fallback"])
def test_gather_rows(benchmark, use_ext):
    from overlap._ext import gather_rows
    if use_ext:
        _ext_or_skip()
    src = torch.randn(4096, 256, device=DEVICE)
    idx = torch.randint(0, 4096, (8192,), device=DEVICE)
    benchmark(_on_device(benchmark, lambda: gather_rows(src, idx, use_extension=use_ext)))


@pytest.mark.parametrize("use_ext", [True, False], ids=["extension", "fallback"])
def test_scatter_add_rows(benchmark, use_ext):
    from overlap._ext import scatter_add_rows_
    if use_ext:
        _ext_or_skip()
    out = torch.zeros(4096, 256, device=DEVICE)
    src = torch.randn(8192, 256, device=DEVICE)
    idx = torch.randint(0, 4096, (8192,), device=DEVICE)
    benchmark(_on_device(benchmark, lambda: scatter_add_rows_(out, src, idx,
                                                              use_extension=use_ext)))


@pytest.mark.parametrize("use_ext", [True, False], ids=["extension", "fallback"])
def test_sm_copy(benchmark, use_ext):
    from overlap._ext import sm_copy_
    if use_ext:
        _ext_or_skip()
    src = torch.randn(1 << 22, device=DEVICE)
    dst = torch.empty_like(src)
    benchmark(_on_device(benchmark, lambda: sm_copy_(dst, src, use_extension=use_ext)))


def test_persistent_matmul(benchmark):
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels are timed on CUDA only (under the CPU interpreter a "
                    "timing means nothing); no GPU here")
    import overlap.kernels as K
    if not K.HAS_TRITON:
        pytest.skip(f"triton unavailable: {K.TRITON_ERROR}")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    benchmark(_on_device(benchmark, lambda: K.persistent_matmul(a, b, num_sms=112)))
    benchmark.extra_info["tflops"] = 2 * 4096 ** 3 / benchmark.stats.stats.median / 1e12
