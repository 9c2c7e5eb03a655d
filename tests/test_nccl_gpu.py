"""GPU checks of the NCCL paths (one GPU, world size 1): the wait policy of
overlap.p2p.Handle on a real ProcessGroupNCCL, and the runtime's device clock.  Skipped
with the reason where CUDA (or NCCL) is missing; the same logic is pinned on CPU with
fakes in tests/test_p2p.py and tests/test_runtime_timing.py."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.gpu_workers import runtime_device_clock, stream_ordered_waits
from tests.mp import run_ranks
from tests.test_runtime_timing import _check_consistent

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_nccl_available()),
                       reason="this torch has no NCCL"),
]


def test_nccl_waits_do_not_block_the_host_except_host_waits():
    r = run_ranks(stream_ordered_waits, 1, backend="nccl", timeout=180)[0]
    busy = r["busy_s"]
    assert r["stream_ordered"]
    assert r["hot_wait_s"] < 0.25 * busy, r       # returned while the stream was busy
    assert r["still_queued"], r                   # ... and the transfer had not run yet
    assert r["ordered"]                           # later kernels saw the data
    assert r["host_wait_s"] > 0.5 * busy, r       # host=True waited for the transfer
    assert r["host_copy"] == ("cpu", True)
    assert r["private_wait_s"] < 0.5 * busy, r    # not queued behind the busy stream


def test_runtime_timeline_is_on_the_device_clock():
    r = run_ranks(runtime_device_clock, 1, backend="nccl", timeout=240)[0]
    assert r["transport"] == "nccl" and r["closed"]
    assert r["pending"]                           # step() did not read its events
    wall, busy, wait, n = r["stats"]
    _check_consistent(r["stats"], r["timeline"])
    # each forward keeps the stream busy f_s: the device clock sees it, launch time would not
    assert busy >= 0.8 * r["num_f"] * r["f_s"], r["stats"]
    assert r["host_step_s"] < wall, (r["host_step_s"], wall)  # the host queued ahead
