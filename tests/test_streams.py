"""overlap.streams: the CPU twin's interface and errors; priorities and ordering on CUDA."""
import subprocess
import sys

import pytest
import torch

from overlap.streams import HostStream, StreamEvent, StreamPair, priority_range, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_import_probes_no_device():
    code = ("import sys, overlap, overlap.streams, overlap.timeline, overlap.fb\n"
            "import torch\n"
            "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cpu_twin_interface():
    pair = StreamPair.create("cpu")
    assert not pair.is_cuda and pair.device == torch.device("cpu")
    assert isinstance(pair.comm, HostStream) and isinstance(pair.compute, HostStream)
    assert pair.current() is pair.compute
    assert pair.stream("comm") is pair.comm
    t = torch.ones(3)
    with pair.on("comm") as s:
        assert s is None
        ev = pair.record("comm", extra_tensors=[t])
    assert isinstance(ev, StreamEvent) and ev.query() and ev.event is None
    assert ev.extra_tensors == (t,)
    with ev:  # DeepEP style: the block overlaps, the exit waits
        pass
    assert ev.extra_tensors == ()  # released once waited on
    ev2 = pair.record()
    pair.wait(ev2)
    pair.wait(ev2, None)
    ev2.synchronize()
    ev2.current_stream_wait()
    assert ev2.elapsed_s(ev) == 0.0
    pair.handoff(t, to="comm")
    pair.handoff([t, None], to="compute")
    pair.handoff(None, to="comm")
    pair.synchronize()
    with pair.on("compute", wait_for=None, join=True):
        pass
    with pair.on("compute", wait_for=ev2):
        pass
    assert priority_range("cpu") == (0, 0)
    assert "cpu" in repr(pair)


def test_for_device_is_cached_and_dedicated_compute_twin():
    assert StreamPair.for_device("cpu") is StreamPair.for_device(torch.device("cpu"))
    p = StreamPair.create("cpu", compute_priority="low")
    assert isinstance(p.compute, HostStream) and p.compute is not p.comm


def test_errors_say_what_to_change():
    pair = StreamPair.create("cpu")
    with pytest.raises(ValueError, match="'compute', 'comm'"):
        pair.stream("copy")
    with pytest.raises(ValueError, match="wait_for"):
        pair.on("comm", wait_for="previous")
    with pytest.raises(TypeError, match="StreamEvent"):
        pair.wait("not an event")
    with pytest.raises(ValueError, match="not supported"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cpu'"):
            StreamPair.create("cuda")
        assert resolve_device(None) == torch.device("cpu")


# -- CUDA ---------------------------------------------------------------------------------
@pytest.mark.gpu
@cuda
def test_cuda_priorities_and_current_compute():
    lo, hi = priority_range()
    pair = StreamPair.create()
    assert pair.is_cuda
    assert pair.comm.priority == hi  # communication gets the highest priority
    assert pair.compute == torch.cuda.current_stream()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        assert pair.compute == s  # "current" follows the caller
    ded = StreamPair.create(comm_priority="low", compute_priority="high")
    assert ded.comm.priority == lo and ded.compute.priority == hi
    with pytest.raises(ValueError, match="priority range"):
        StreamPair.create(comm_priority=hi - 1 if hi < lo else hi + 1)


@pytest.mark.gpu
@cuda
def test_cuda_ordering_and_handoff():
    pair = StreamPair.create()
    x = torch.randn(4096, 4096, device="cuda")
    y = x @ x  # on compute
    with pair.on("comm"):  # waits for y
        pair.handoff(y, to="comm")
        z = y * 2
    ev = pair.record("comm", extra_tensors=[z])
    with ev:
        w = x + 1  # overlaps
    assert ev.extra_tensors == ()
    torch.testing.assert_close(z, (x @ x) * 2)
    with pair.on("comm", join=True):
        u = w * 3
    torch.testing.assert_close(u + 0, (x + 1) * 3)
    t0, t1 = pair.record(timing=True), None
    _ = x @ x
    t1 = pair.record(timing=True)
    t1.synchronize()
    assert t0.elapsed_s(t1) > 0
