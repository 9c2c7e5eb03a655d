"""Functions run on one GPU rank (NCCL, world size 1) by tests/test_nccl_gpu.py."""
from __future__ import annotations

import datetime
import time

import torch
import torch.nn as nn

TO = datetime.timedelta(seconds=60)


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` needs to keep a stream busy ``seconds``.

    Calibrated on a warm GPU (an idle one runs at a fraction of its clock, and the first
    launch loads the kernel's module): a warm-up sleep first, then the median of three
    ~50 ms measurements."""
    torch.cuda._sleep(50_000_000)
    torch.cuda.synchronize()
    cycles = 100_000_000
    rates = []
    for _ in range(3):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        torch.cuda._sleep(cycles)
        e1.record()
        e1.synchronize()
        rates.append(cycles / (e0.elapsed_time(e1) / 1e3))
    return int(sorted(rates)[1] * seconds)


def stream_ordered_waits(rank: int, world: int):
    """overlap.p2p.Handle on a real ProcessGroupNCCL: the hot-path wait returns while the
    transfer is still queued; host=True waits for it; a collective from a private
    stream does not queue behind the current stream."""
    from overlap.p2p import P2P
    busy_s = 0.2
    cycles = _sleep_cycles(busy_s)
    p = P2P()
    x = torch.arange(4, device="cuda")
    res = {"busy_s": busy_s}
    # the communicator exists and NCCL's kernels are loaded before anything is timed
    p.all_gather(x, world, "warm-up").wait(TO, host=True)
    torch.cuda.synchronize()

    torch.cuda._sleep(cycles)                      # the current stream is busy for busy_s
    h = p.all_gather(x, world, "hot path")
    t0 = time.perf_counter()
    h.wait(TO)
    res["hot_wait_s"] = time.perf_counter() - t0
    res["still_queued"] = not h.works[0].is_completed()
    y = h.tensors[0] + 1                           # ordered after the transfer
    torch.cuda.synchronize()
    res["ordered"] = torch.equal(y.cpu(), x.cpu() + 1)
    res["stream_ordered"] = h.stream_ordered

    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    out = p.all_gather(x, world, "host wait").wait(TO, host=True)
    res["host_wait_s"] = time.perf_counter() - t0
    res["host_copy"] = (out[0].device.type, torch.equal(out[0], x.cpu()))

    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    with torch.cuda.stream(torch.cuda.Stream()):
        p.all_gather(x, world, "private").wait(TO, host=True)
    res["private_wait_s"] = time.perf_counter() - t0
    torch.cuda.synchronize()
    return res


class SleepyStage(nn.Module):
    """A linear layer whose forward also keeps the stream busy for a known time."""

    def __init__(self, dim: int, cycles: int):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.cycles = cycles

    def forward(self, x):
        torch.cuda._sleep(self.cycles)
        return torch.tanh(self.lin(x))


def runtime_device_clock(rank: int, world: int):
    """DualPipeV on one GPU (NCCL): stats and timeline on the device clock, the NCCL CTA
    cap accepted by real communicators, close() shutting them down."""
    from dualpipe import DualPipeV
    f_s, N, dim = 0.005, 4, 64
    cycles = _sleep_cycles(f_s)
    mods = [SleepyStage(dim, cycles).cuda() for _ in range(2)]
    res = {"f_s": f_s, "num_f": 2 * N}
    p = DualPipeV(mods, timeout=60, nccl_max_ctas=8, confirm_steps=False)
    res["transport"] = p.transport
    x, y = torch.randn(N * 2, dim, device="cuda"), torch.randn(N * 2, dim, device="cuda")
    crit = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    for _ in range(2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        p.step(x, num_chunks=N, criterion=crit, labels=(y,))
        res["host_step_s"] = time.perf_counter() - t0   # queued, not finished
        res["pending"] = p._pending is not None
        st = p.last_stats
        res["stats"] = (st.wall, st.busy, st.wait, st.num_compute)
        res["timeline"] = [(iv.start, iv.end, str(iv.action), iv.lane) for iv in p.timeline]
    p.close()
    res["closed"] = True
    return res
