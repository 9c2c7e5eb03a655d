"""overlap.transport: both transports implement the one protocol, with the one handle type.

:class:`overlap.p2p.P2P` (process group) and :class:`overlap.shm.ShmP2P` (shared memory)
must satisfy :class:`overlap.transport.Transport` -- the structural ``isinstance`` check
and the same signatures as the protocol's methods -- and every handle they return is an
:class:`overlap.transport.TransferHandle` whose ``wait``/``is_completed`` have the base's
signatures.  Live handles come from one-rank transports (a gloo backend over a
``HashStore``; ``ShmP2P.create`` with one rank).
"""
from __future__ import annotations

import datetime
import inspect

import pytest
import torch
import torch.distributed as dist

import overlap
from overlap import p2p, shm, transport
from overlap._ext import load_extension
from overlap.transport import TransferHandle, Transport

TIMEOUT = datetime.timedelta(seconds=10)
_PROTOCOL_METHODS = ("isend", "irecv", "all_gather", "poll", "close")


def _params(fn) -> list[tuple]:
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", [p2p.P2P, shm.ShmP2P])
def test_transport_classes_have_the_protocols_methods_and_signatures(cls):
    assert isinstance(cls.__new__(cls), Transport)
    assert isinstance(cls.needs_poll, bool)
    for name in _PROTOCOL_METHODS:
        assert _params(getattr(cls, name)) == _params(getattr(Transport, name)), name


@pytest.mark.parametrize("cls", [p2p.Handle, shm.ShmHandle])
def test_handles_are_the_one_handle_type(cls):
    assert issubclass(cls, TransferHandle)
    for name in ("wait", "is_completed"):
        assert _params(getattr(cls, name)) == _params(getattr(TransferHandle, name)), name
    # the attributes every handle has live in the base's slots, not again in each subclass
    assert not set(TransferHandle.__slots__) & set(cls.__slots__)


def test_failures_have_one_home():
    for name in ("PeerError", "PeerTimeout", "PeerLost", "PeerExited", "PeerAborted"):
        assert getattr(p2p, name) is getattr(transport, name) is getattr(overlap, name)
        assert getattr(shm, name) is getattr(transport, name)
    assert issubclass(transport.PeerExited, transport.PeerLost)


def test_process_group_transport_live():
    pg = dist.ProcessGroupGloo(dist.HashStore(), 0, 1, TIMEOUT)
    t = p2p.P2P(backend=pg, rank=0)
    assert isinstance(t, Transport)
    assert t.needs_poll is False and t.poll() is None  # a real method that has nothing to do
    h = t.all_gather(torch.tensor([7]), 1, "gather")
    assert isinstance(h, TransferHandle) and isinstance(h, p2p.Handle)
    assert [x.tolist() for x in h.wait(TIMEOUT)] == [[7]] and h.done and h.peer == -1
    t.close()


def test_shared_memory_transport_live():
    ext = load_extension()
    if ext is None or not hasattr(ext, "ring_write") or not ext.shm_supported():
        pytest.skip("the shared-memory transport needs the compiled extension and futexes")
    t = shm.ShmP2P.create(dist.HashStore(), "transport-test", 0, 1, timeout=10)
    assert t is not None
    try:
        assert isinstance(t, Transport)
        assert t.needs_poll is True and t.poll() is None
        h = t.all_gather(torch.tensor([7]), 1, "gather")
        assert isinstance(h, TransferHandle) and isinstance(h, shm.ShmHandle)
        assert [x.tolist() for x in h.wait(TIMEOUT)] == [[7]] and h.done and h.peer == -1
    finally:
        t.close()
