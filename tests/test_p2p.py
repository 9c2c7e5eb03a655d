"""overlap.p2p: metadata packing, the one-direction-per-backend routing, and the wait
policy of Handle (stream-ordered on NCCL, host-blocking with a timeout on gloo)."""
import datetime
import time

import pytest
import torch

from overlap.p2p import (META_LEN, P2P, Handle, PeerAborted, PeerLost, PeerTimeout, TensorMeta,
                         pack_meta, unpack_meta)


def test_meta_roundtrip():
    metas = [TensorMeta((2, 3), torch.float32, True), TensorMeta((4,), torch.int64, False),
             TensorMeta((), torch.bfloat16, False)]
    t = pack_meta(metas)
    assert t.shape == (META_LEN,) and t.dtype == torch.int64
    assert unpack_meta(t) == metas


def test_meta_too_large_says_what_to_change():
    with pytest.raises(ValueError, match="at most"):
        pack_meta([TensorMeta((1, 2, 3, 4, 5, 6), torch.float32, False)] * 10)


class _Rec:
    def __init__(self, name):
        self.name, self.calls = name, []

    def send(self, ts, peer, tag):
        self.calls.append(("send", peer))
        return _Done()

    def recv(self, ts, peer, tag):
        self.calls.append(("recv", peer))
        return _Done()


class _Done:
    def is_completed(self):
        return True

    def wait(self, timeout=None):
        return True


def test_directional_backends_carry_one_direction_each():
    # rank 1 of 3: to/from rank 2 (higher) and rank 0 (lower)
    up, down = _Rec("up"), _Rec("down")
    p = P2P(backend=(up, down), rank=1)
    x = torch.zeros(1)
    p.isend([x], 2, "a")   # to a higher rank: up
    p.irecv([x], 2, "b")   # from a higher rank: that rank sent "down"
    p.isend([x], 0, "c")   # to a lower rank: down
    p.irecv([x], 0, "d")   # from a lower rank: it sent "up"
    assert up.calls == [("send", 2), ("recv", 0)]
    assert down.calls == [("recv", 2), ("send", 0)]
    with pytest.raises(ValueError, match="group rank"):
        P2P(backend=(up, down))


# ---- the wait policy (overlap.p2p.Handle), pinned with fake Work objects ---------------
#
# A stream-ordered handle (NCCL on CUDA tensors) must never block the host inside the hot
# path: Work.wait() without a timeout (the current stream waits), no polling.  Only
# wait(host=True) polls is_completed() with a deadline.  A host-ordered handle (gloo)
# waits with the timeout, as it always did.

TO = datetime.timedelta(seconds=5)


class FakeWork:
    """Records every call; completes after ``polls`` is_completed() queries."""

    def __init__(self, polls=0, result=True, error=None, host_blocking_forbidden=False):
        self.calls, self.polls, self.result, self.error = [], polls, result, error
        self.forbid = host_blocking_forbidden

    def is_completed(self):
        self.calls.append(("is_completed",))
        if self.polls > 0:
            self.polls -= 1
            return False
        return True

    def wait(self, *args, **kwargs):
        self.calls.append(("wait", args, kwargs))
        if self.forbid and (args or kwargs):
            raise AssertionError("Work.wait(timeout) blocks the host on NCCL")
        if self.error is not None:
            raise self.error
        return self.result


def test_stream_ordered_wait_never_blocks_the_host():
    works = [FakeWork(polls=10**9, host_blocking_forbidden=True) for _ in range(2)]
    x = torch.zeros(2)
    h = Handle(works, [x], "activation for F0.1", 1, stream_ordered=True)
    t0 = time.monotonic()
    assert h.wait(datetime.timedelta(seconds=30))[0] is x
    assert time.monotonic() - t0 < 1.0
    # exactly one stream-ordered wait per work, no timeout, no completion polling
    assert [w.calls for w in works] == [[("wait", (), {})]] * 2
    h.wait(TO)  # waited already: nothing more
    assert [len(w.calls) for w in works] == [1, 1]


def test_stream_ordered_release_and_drain_ignore_abort():
    w = FakeWork(polls=10**9, host_blocking_forbidden=True)
    h = Handle([w], [torch.ones(1)], "send F0.0", 1, stream_ordered=True)
    h.wait(TO, lambda: "rank 2 failed")  # nothing blocks, so nothing to abort
    assert w.calls == [("wait", (), {})]


def test_stream_ordered_host_wait_polls_with_a_deadline_then_orders_the_stream():
    w = FakeWork(polls=3, host_blocking_forbidden=True)
    x = torch.arange(3)
    h = Handle([w], [x], "shapes for F0.0", 1, stream_ordered=True)
    out = h.wait(TO, host=True)
    assert torch.equal(out[0], x)
    assert w.calls == [("is_completed",)] * 4 + [("wait", (), {})]


def test_stream_ordered_host_wait_times_out_without_blocking():
    w = FakeWork(polls=10**9, host_blocking_forbidden=True)
    h = Handle([w], [torch.zeros(1)], "end-of-step agreement", -1, stream_ordered=True)
    t0 = time.monotonic()
    with pytest.raises(PeerTimeout, match="end-of-step agreement: no answer within 0.05 s"):
        h.wait(datetime.timedelta(seconds=0.05), host=True)
    assert 0.05 <= time.monotonic() - t0 < 2.0
    assert all(c == ("is_completed",) for c in w.calls)  # never a host-blocking wait


def test_stream_ordered_host_wait_reports_a_failure_elsewhere():
    w = FakeWork(polls=10**9, host_blocking_forbidden=True)
    h = Handle([w], [torch.zeros(1)], "step handshake", -1, stream_ordered=True)
    with pytest.raises(PeerAborted, match="rank 3 failed"):
        h.wait(datetime.timedelta(seconds=30), lambda: "rank 3 failed", host=True)


def test_stream_ordered_errors_become_peer_errors():
    w = FakeWork(error=RuntimeError("NCCL communicator was aborted on rank 1"))
    with pytest.raises(PeerLost, match="connection failed"):
        Handle([w], [torch.zeros(1)], "gradient for B1.0", 2, stream_ordered=True).wait(TO)


def test_host_ordered_wait_is_gloo_wait_with_the_timeout():
    works = [FakeWork(), FakeWork()]
    h = Handle(works, [torch.zeros(1)], "activation for F0.1", 1)
    h.wait(TO)
    assert [w.calls for w in works] == [[("wait", (TO,), {})]] * 2
    w = FakeWork()
    Handle([w], [torch.zeros(1)], "x", 1).wait(TO, host=True)  # host is moot for gloo
    assert w.calls == [("wait", (TO,), {})]


def test_host_ordered_wait_with_abort_polls_then_waits():
    w = FakeWork(polls=2)
    Handle([w], [torch.zeros(1)], "step handshake", -1).wait(TO, lambda: None)
    assert w.calls == [("is_completed",)] * 3 + [("wait", (TO,), {})]


@pytest.mark.parametrize("work,error,match", [
    (FakeWork(result=False), PeerTimeout, "rank 1 did not answer within 5 s"),
    (FakeWork(error=RuntimeError("[gloo] Timed out waiting 5000ms for recv")), PeerTimeout,
     "did not answer"),
    (FakeWork(error=RuntimeError("Connection closed by peer")), PeerLost, "connection failed"),
])
def test_host_ordered_wait_failures(work, error, match):
    with pytest.raises(error, match=match):
        Handle([work], [torch.zeros(1)], "activation for F0.1", 1).wait(TO)


class _FakeCudaTensor:
    is_cuda = True

    def detach(self):
        return self


def test_p2p_makes_nccl_cuda_transfers_stream_ordered():
    up, down = _Rec("up"), _Rec("down")
    nccl = P2P(backend=(up, down), rank=1, nccl=True)
    assert nccl.isend([_FakeCudaTensor()], 2, "a").stream_ordered
    assert nccl.irecv([_FakeCudaTensor()], 0, "b").stream_ordered
    assert not nccl.isend([torch.zeros(1)], 2, "c").stream_ordered  # CPU tensor: host-ordered
    gloo = P2P(backend=(up, down), rank=1)  # not a ProcessGroupNCCL: host-ordered
    assert not gloo.isend([_FakeCudaTensor()], 2, "d").stream_ordered


def test_host_wait_after_a_stream_ordered_wait_still_polls():
    # the earlier wait only ordered a stream; the host must still see the transfer finish
    w = FakeWork(polls=2, host_blocking_forbidden=True)
    h = Handle([w], [torch.zeros(1)], "shapes for F0.0", 1, stream_ordered=True)
    h.wait(TO)
    h.wait(TO, host=True)
    assert w.calls == [("wait", (), {})] + [("is_completed",)] * 3 + [("wait", (), {})]
