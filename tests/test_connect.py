"""overlap.connect: choosing and opening a transport, and building and releasing the
private process groups it runs over.

The mode/backend/device check; 1-rank transports of each kind on CPU (gloo over a
``HashStore``, shared memory, NCCL with fake communicators); a setup failure and a
timeout as :class:`~overlap.connect.TransportSetupError`; 2-rank transports in each mode
on a real gloo group; the release of NCCL communicators (fakes).
"""
from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

import overlap
from overlap import connect, p2p, shm
from overlap._ext import load_extension
from overlap.transport import PeerError, Transport
from tests.connect_workers import open_each_mode
from tests.mp import run_ranks

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
TO = datetime.timedelta(seconds=10)


def _shm_available() -> bool:
    ext = load_extension()
    return ext is not None and hasattr(ext, "ring_write") and ext.shm_supported()


class _Group:
    """What open_transport asks of a group: this rank and the size."""

    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


def test_public_names():
    for name in ("open_transport", "Connection", "TransportSetupError"):
        assert getattr(overlap, name) is getattr(connect, name)
    assert connect.MODES == ("auto", "shm", "group")
    assert issubclass(connect.TransportSetupError, PeerError)


@pytest.mark.parametrize("mode", connect.MODES)
def test_check_mode_accepts_what_can_work(mode):
    assert connect.check_mode(mode, "gloo", CPU) == mode
    if mode != "shm":
        assert connect.check_mode(mode, "nccl", CUDA) == mode
        assert connect.check_mode(mode, "mpi", CPU) == mode   # another backend: its group


@pytest.mark.parametrize("mode,backend,device,text", [
    ("bogus", "gloo", CPU, "transport must be one of ['auto', 'shm', 'group'], got 'bogus'"),
    ("off", "gloo", CPU, "must be one of"),                  # ShmP2P.create's name for it
    ("shm", "nccl", CUDA, "transport='shm' moves CPU tensors between processes of one host"),
    ("shm", "gloo", CUDA, "this pipeline uses gloo with stages on cuda:0"),
    ("auto", "nccl", CPU, "the process group uses NCCL but the stage modules are on cpu"),
    ("group", "gloo", CUDA, "gloo cannot send CUDA tensors between ranks"),
])
def test_check_mode_refuses_what_cannot(mode, backend, device, text):
    with pytest.raises(ValueError) as e:
        connect.check_mode(mode, backend, device)
    assert text in str(e.value)
    with pytest.raises(ValueError):  # open_transport checks first: nothing is built
        connect.open_transport(_Group(0, 1), None, "p", backend=backend, device=device,
                               mode=mode)


def test_group_mode_opens_a_private_gloo_group():
    calls = []

    def ring_bytes():
        calls.append(1)
        return 1 << 16

    conn = connect.open_transport(_Group(0, 1), dist.HashStore(), "connect/gloo",
                                  backend="gloo", device=CPU, mode="group", timeout=10,
                                  ring_bytes=ring_bytes)
    assert conn.name == "gloo" and conn.shm is None and not conn.closed
    assert isinstance(conn.groups, dist.ProcessGroupGloo)
    assert isinstance(conn.transport, p2p.P2P) and isinstance(conn.transport, Transport)
    assert conn.transport.backend is conn.groups   # the private group, not the caller's
    assert calls == [1]  # shared memory was asked (and declined: "group")
    h = conn.transport.all_gather(torch.tensor([7]), 1, "gather")
    assert [x.tolist() for x in h.wait(TO)] == [[7]]
    conn.close()
    conn.close()
    assert conn.closed and conn.groups is None


@pytest.mark.parametrize("mode", ["auto", "shm"])
def test_shared_memory_opens_when_it_can(mode):
    if not _shm_available():
        pytest.skip("the shared-memory transport needs the compiled extension and futexes")
    conn = connect.open_transport(_Group(0, 1), dist.HashStore(), f"connect/{mode}",
                                  backend="gloo", device=CPU, mode=mode, timeout=10,
                                  ring_bytes=1 << 16)
    try:
        assert conn.name == "shm" and conn.groups is None
        assert isinstance(conn.transport, shm.ShmP2P) and conn.shm is conn.transport
        assert conn.transport.ring_bytes == 1 << 16
        h = conn.transport.all_gather(torch.tensor([7]), 1, "gather")
        assert [x.tolist() for x in h.wait(TO)] == [[7]]
    finally:
        conn.close()
    with pytest.raises(PeerError):  # closed: the transport refuses further calls
        conn.transport.all_gather(torch.tensor([7]), 1, "gather")


def test_shm_mode_refused_everywhere_raises_value_error(monkeypatch):
    def no_extension():
        raise shm.ShmUnavailable("no extension here")

    monkeypatch.setattr(shm, "_ext", no_extension)
    with pytest.raises(ValueError, match="asked for the shared-memory transport") as e:
        connect.open_transport(_Group(0, 1), dist.HashStore(), "connect/refused",
                               backend="gloo", device=CPU, mode="shm", timeout=10)
    assert isinstance(e.value.__cause__, shm.ShmUnavailable)
    # "auto" falls back to the private gloo group instead
    conn = connect.open_transport(_Group(0, 1), dist.HashStore(), "connect/fallback",
                                  backend="gloo", device=CPU, mode="auto", timeout=10)
    assert conn.name == "gloo"
    conn.close()


def test_nccl_opens_two_private_communicators(monkeypatch):
    monkeypatch.setattr(dist, "ProcessGroupNCCL", _FakePGNCCL, raising=False)
    monkeypatch.setattr(_FakePGNCCL, "made", [])

    def ring_bytes():
        raise AssertionError("shared memory is never tried on NCCL")

    conn = connect.open_transport(_Group(1, 2), dist.HashStore(), "connect/nccl",
                                  backend="nccl", device=CUDA, timeout=21,
                                  ring_bytes=ring_bytes, max_ctas=8)
    up, down = conn.groups
    assert conn.name == "nccl" and conn.shm is None and _FakePGNCCL.made == [up, down]
    assert up.opts._timeout == datetime.timedelta(seconds=42)  # the watchdog: twice
    assert up.opts.config.max_ctas == 8 and (up.rank, up.size) == (1, 2)
    assert isinstance(conn.transport, p2p.P2P) and conn.transport.backend == (up, down)
    conn.close(failed=True)
    conn.close()
    assert up.calls == down.calls == ["abort"]


def test_a_store_failure_is_a_setup_error():
    class Broken(dist.HashStore):
        def add(self, key, n):
            raise RuntimeError("Connection reset by peer\nmore detail")

    with pytest.raises(connect.TransportSetupError) as e:
        connect.open_transport(_Group(0, 2), Broken(), "connect/broken", backend="gloo",
                               device=CPU, timeout=10)
    assert str(e.value) == ("setting up the pipeline's communicators: RuntimeError: "
                            "Connection reset by peer")
    assert not e.value.timed_out and isinstance(e.value.__cause__, RuntimeError)


def test_a_missing_rank_is_a_setup_timeout():
    with pytest.raises(connect.TransportSetupError) as e:   # rank 1 never comes
        connect.open_transport(_Group(0, 2), dist.HashStore(), "connect/alone",
                               backend="gloo", device=CPU, mode="group", timeout=0.5)
    assert e.value.timed_out and isinstance(e.value.__cause__, PeerError)


def test_two_ranks_open_each_mode():
    res = run_ranks(open_each_mode, 2, timeout=180)
    for rank, r in enumerate(res):
        other = float(1 - rank)
        assert r["group"]["name"] == "gloo" and r["group"]["groups"] == "ProcessGroupGloo"
        modes = ("auto", "group", "shm") if _shm_available() else ("group",)
        for mode in modes + ("other",):
            assert r[mode]["is_transport"] and r[mode]["closed"], (mode, r[mode])
            assert r[mode]["got"] == [other] * 3 and r[mode]["rows"] == [0, 10], (mode, r)
        if _shm_available():
            assert r["auto"]["name"] == r["shm"]["name"] == "shm"
            assert r["auto"]["transport"] == "ShmP2P" and r["auto"]["shm"]
        else:
            assert r["auto"]["name"] == "gloo" and r["shm"][0] == "ValueError"
        # another backend: the caller's group carries the traffic itself
        assert r["other"]["name"] == "mpi" and r["other"]["groups"] == "NoneType"
        assert r["other"]["callers_group"] and r["other"]["got"] == [other] * 3


# ---- the private NCCL communicators (fakes) ------------------------------------------------

class Comm:
    def __init__(self, log, name, methods, fail=False):
        for m in methods:
            def call(m=m):
                log.append((name, m))
                if fail:
                    raise RuntimeError("communicator already gone")
            setattr(self, m, call)


@pytest.mark.parametrize("failed,methods,expect", [
    (False, ("shutdown", "abort"), "shutdown"),
    (True, ("shutdown", "abort"), "abort"),
    (False, ("_shutdown", "abort"), "_shutdown"),   # torch before shutdown() was public
    (False, ("abort",), "abort"),
    (True, ("shutdown",), "shutdown"),
])
def test_release_groups_prefers_shutdown_or_abort(failed, methods, expect):
    log = []
    connect.release_groups((Comm(log, "up", methods), Comm(log, "down", methods)), failed)
    assert log == [("up", expect), ("down", expect)]


def test_release_groups_never_raises():
    log = []
    connect.release_groups((Comm(log, "up", ("shutdown",), fail=True), object(),
                        Comm(log, "down", ("shutdown",))), False)
    assert log == [("up", "shutdown"), ("down", "shutdown")]


class _Config:
    max_ctas = min_ctas = None


class _FakePGNCCL:
    made: list = []
    fail_on = None

    class Options:
        def __init__(self):
            self.is_high_priority_stream = False
            self.config = _Config()
            self._timeout = None

    def __init__(self, store, rank, size, opts):
        if len(_FakePGNCCL.made) == _FakePGNCCL.fail_on:
            raise RuntimeError("NCCL init failed")
        self.store, self.rank, self.size, self.opts = store, rank, size, opts
        self.calls = []
        _FakePGNCCL.made.append(self)

    def abort(self):
        self.calls.append("abort")

    def shutdown(self):
        self.calls.append("shutdown")


def test_nccl_groups_carry_the_cta_cap_priority_and_timeout(monkeypatch):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setattr(dist, "ProcessGroupNCCL", _FakePGNCCL, raising=False)
    monkeypatch.setattr(_FakePGNCCL, "made", [])
    to = datetime.timedelta(seconds=42)
    up, down = connect.nccl_groups(dist.HashStore(), "dualpipe/g/1", 1, 4, to, 24)
    for g in (up, down):
        assert (g.rank, g.size) == (1, 4)
        assert g.opts.config.max_ctas == 24 and g.opts.config.min_ctas is None
        assert g.opts.is_high_priority_stream and g.opts._timeout == to
    up.store.set("k", "v")  # the two use distinct store prefixes
    assert up.store.check(["k"]) and not down.store.check(["k"])
    # no cap asked: NCCL's default (or $NCCL_MAX_CTAS) is left alone
    a, _ = connect.nccl_groups(dist.HashStore(), "p", 0, 2, to, None)
    assert a.opts.config.max_ctas is None


def test_nccl_groups_abort_the_first_when_the_second_fails(monkeypatch):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    monkeypatch.setattr(dist, "ProcessGroupNCCL", _FakePGNCCL, raising=False)
    monkeypatch.setattr(_FakePGNCCL, "made", [])
    monkeypatch.setattr(_FakePGNCCL, "fail_on", 1)
    with pytest.raises(RuntimeError, match="NCCL init failed"):
        connect.nccl_groups(dist.HashStore(), "p", 0, 2, datetime.timedelta(seconds=5), 8)
    assert [g.calls for g in _FakePGNCCL.made] == [["abort"]]


