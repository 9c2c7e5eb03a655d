"""Stages whose costs are known: calibrated sleep layers and deterministic MLP blocks.

A sleep layer's forward costs ``f`` seconds and its backward ``b`` (``b - w`` on the input
path, ``w`` on the weight path), on CPU by sleeping the host and on CUDA by spinning the
GPU (``torch.cuda._sleep``), so measured pipelines can be compared with the simulator.
"""
from __future__ import annotations

import time


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
