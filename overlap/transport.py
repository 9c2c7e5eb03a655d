"""The transport interface: what the pipeline runtime needs to move a stage boundary.

Two transports implement it (``docs/transport.md``):

* :class:`overlap.p2p.P2P` -- a process group's backend (gloo, NCCL), any hosts;
* :class:`overlap.shm.ShmP2P` -- shared memory, every rank on one host, CPU tensors.

Both satisfy :class:`Transport` (a ``typing.Protocol``, checkable with ``isinstance``):
a caller *posts* transfers (:meth:`~Transport.isend`, :meth:`~Transport.irecv`,
:meth:`~Transport.all_gather`), each returning a :class:`TransferHandle`; it *waits* on
the handle (:meth:`TransferHandle.wait`, which returns the tensors or raises a
:class:`PeerError`); it *polls* the transport between computations (:meth:`~Transport.poll`,
needed only where :attr:`~Transport.needs_poll` is true); and it *closes* it
(:meth:`~Transport.close`).  Ranks are the transport's group ranks.  The failures every
transport reports, :class:`PeerError` and its subclasses, are defined here.

This module imports neither torch nor ``dualpipe``.
"""

from __future__ import annotations

import abc
import datetime
from typing import TYPE_CHECKING, Callable, Optional, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["Transport", "TransferHandle", "Abort", "PeerError", "PeerTimeout", "PeerLost",
           "PeerExited", "PeerAborted"]

#: ``abort()`` returns a failure message (another rank failed: stop waiting) or ``None``.
Abort = Callable[[], Optional[str]]


class PeerError(RuntimeError):
    """A transfer with ``peer`` failed; ``what`` says which."""

    def __init__(self, msg: str, peer: int = -1, what: str = ""):
        self.peer, self.what = peer, what
        super().__init__(msg)


class PeerTimeout(PeerError):
    """A peer did not send (or receive) within the timeout."""


class PeerLost(PeerError):
    """The connection to a peer closed: it crashed, was killed or aborted."""


class PeerExited(PeerLost):
    """The peer's process is gone (or closed its transport) without reporting a failure:
    no other rank will record one, so the waiting rank reports it at once."""


class PeerAborted(PeerError):
    """Another rank reported a failure (``abort`` callback of :meth:`TransferHandle.wait`)."""


class TransferHandle(abc.ABC):
    """A posted send, receive or all_gather of one transport: the one handle type.

    :class:`overlap.p2p.Handle` and :class:`overlap.shm.ShmHandle` are its subclasses.
    Every handle has these attributes (the subclasses set them; this base has no
    ``__init__``, so making a handle costs what it did):

    ``tensors``
        the tensors sent, or the buffers received into (an all_gather: one per rank);
    ``what``
        what the transfer carries, for error messages (``"recv F0.3 from rank 1"``);
    ``peer``
        the other group rank (``-1`` for an all_gather);
    ``done``
        ``True`` once the transfer is known to be complete (set by the transport).
    """

    __slots__ = ("tensors", "what", "peer", "done")

    @abc.abstractmethod
    def is_completed(self) -> bool:
        """Whether the transfer has completed, without blocking."""

    @abc.abstractmethod
    def wait(self, timeout: datetime.timedelta, abort: Abort | None = None, *,
             host: bool = False) -> list["torch.Tensor"]:
        """The transferred tensors (:attr:`tensors`), once they are usable.

        Raises :class:`PeerTimeout` when the peer does not answer within ``timeout``,
        :class:`PeerLost` (or :class:`PeerExited`) when its connection or process is
        gone, :class:`PeerAborted` when ``abort()`` returns a message while this waits
        (polled, not blocked, so a failure elsewhere ends the wait), and
        :class:`PeerError` for other failed transfers.  ``host=True``: the host must
        know the transfer has finished (it reads the values); it matters only for
        stream-ordered handles (:class:`overlap.p2p.Handle`), host-ordered ones always
        block the host."""


@runtime_checkable
class Transport(Protocol):
    """Point-to-point transfers and small all_gathers among the group ranks of a pipeline.

    A transport is used by one thread per process.  Posting never waits for the peer;
    the caller waits on the handles.  Transfers between two ranks with the same ``tag``
    match in the order they were posted (a receive's buffers must have the sizes the
    send's tensors have).
    """

    #: ``False`` when :meth:`poll` does nothing (the backend's own threads or the GPU
    #: move the data), so a hot loop may skip calling it.
    needs_poll: bool

    def isend(self, tensors: Sequence["torch.Tensor"], peer: int, what: str,
              tag: int = 0) -> TransferHandle:
        """Post a send of ``tensors`` to group rank ``peer``."""

    def irecv(self, buffers: Sequence["torch.Tensor"], peer: int, what: str,
              tag: int = 0) -> TransferHandle:
        """Post a receive into ``buffers`` from group rank ``peer``."""

    def all_gather(self, t: "torch.Tensor", world: int, what: str) -> TransferHandle:
        """Post a gather of every rank's ``t`` (in group-rank order) to every rank."""

    def poll(self) -> None:
        """Move what can move without waiting (called between computations)."""

    def close(self, failed: bool = False) -> None:
        """Release this rank's side; ``failed=True``: the pipeline failed (a transport
        that can tells its peers at once, ending their waits)."""
