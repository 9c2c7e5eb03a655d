"""Choosing and opening a transport: which one carries a group's traffic, and the
private process groups it runs over.

:func:`open_transport` is collective over the ranks of a process group.  It picks
between the two transports of :mod:`overlap.transport`
(``docs/transport.md``):

* shared memory (:class:`overlap.shm.ShmP2P`) when the backend is gloo, the tensors are
  on CPU, there is a store, and every rank can map the shared files (one host, the
  extension built);
* otherwise the process group's backend (:class:`overlap.p2p.P2P`) over **private**
  groups of the same ranks: one gloo group, or two NCCL communicators, one per
  direction (:func:`nccl_groups`); another backend: the caller's group itself.

Private groups keep the traffic off the caller's group: dropping them after a failure
closes their connections, so every rank's pending transfer ends at once, while the
caller's group (and its store) stays usable.  The choice is made through the store, so
every rank reaches the same answer.  ``mode`` (:data:`MODES`) is the caller's wish:
``"auto"`` (shared memory when every rank can, else the group), ``"shm"`` (shared memory
or ``ValueError`` on every rank) or ``"group"`` (the process group's backend always);
:func:`check_mode` refuses a mode, backend and device that cannot work together.

Failures: ``ValueError`` for misuse (refused on every rank alike);
:class:`TransportSetupError` (a :class:`~overlap.transport.PeerError`) when another rank
did not arrive in time, failed, exited or lost its connection meanwhile -- whatever
raised it (the shared-memory agreement, the store, a process group), it is the
``__cause__``.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
import torch.distributed as dist

from .p2p import P2P
from .shm import DEFAULT_RING_BYTES, ShmP2P, ShmUnavailable
from .transport import PeerError, PeerTimeout, Transport

__all__ = ["MODES", "Connection", "TransportSetupError", "check_mode", "open_transport",
           "nccl_groups", "release_groups"]

log = logging.getLogger(__name__)

# mode -> the mode of overlap.shm.ShmP2P.create
_SHM_MODES = {"auto": "auto", "shm": "shm", "group": "off"}
#: the values of ``mode``: ``"auto"``, ``"shm"``, ``"group"``
MODES = tuple(_SHM_MODES)


class TransportSetupError(PeerError):
    """Opening a transport failed on this rank because of the others: one did not arrive
    within the timeout (:attr:`timed_out`), or failed, exited or lost its connection
    meanwhile.  The message says what failed; the original exception is the
    ``__cause__``."""

    def __init__(self, msg: str, timed_out: bool = False):
        super().__init__(msg, -1, "opening the transport")
        self.timed_out = timed_out


@dataclass
class Connection:
    """What :func:`open_transport` built on this rank."""

    #: ``"shm"``, ``"gloo"``, ``"nccl"``, or the caller's backend (its group carries
    #: the traffic itself)
    name: str
    #: the :class:`~overlap.transport.Transport` to post transfers on: the
    #: :class:`~overlap.shm.ShmP2P`, or a :class:`~overlap.p2p.P2P` over the private
    #: group(s) or the caller's group
    transport: Transport
    #: the private groups: the gloo group, the ``(up, down)`` NCCL communicators, or
    #: ``None`` (shared memory, another backend)
    groups: Any = None
    closed: bool = False

    @property
    def shm(self) -> ShmP2P | None:
        """The shared-memory transport, or ``None`` when the process group carries it."""
        return self.transport if self.name == "shm" else None

    def close(self, failed: bool = False) -> None:
        """Release this rank's side (idempotent): close the transport (``failed=True``
        on shared memory ends every peer's pending wait at once), shut the private NCCL
        communicators down (abort them after a failure: :func:`release_groups`) and drop
        the private groups (a gloo group closes its connections when its last reference
        goes).  A caller that must also release on garbage collection, as the
        ``dualpipe`` runtime does, can do these two steps itself."""
        if self.closed:
            return
        self.closed = True
        self.transport.close(failed=failed)
        groups, self.groups = self.groups, None
        if self.name == "nccl":
            release_groups(groups, failed)


def check_mode(mode: str, backend: str, device: torch.device) -> str:
    """``mode`` if it can work with a group of ``backend`` moving tensors on ``device``,
    else ``ValueError`` saying what to change."""
    if mode not in _SHM_MODES:
        raise ValueError(f"transport must be one of {list(MODES)}, got {mode!r}")
    if mode == "shm" and (backend != "gloo" or device.type != "cpu"):
        raise ValueError(f"transport='shm' moves CPU tensors between processes of one "
                         f"host; this pipeline uses {backend} with stages on "
                         f"{device}: use transport='auto' or 'group'")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("the process group uses NCCL but the stage modules are on "
                         f"{device}; move them to the rank's GPU")
    if backend == "gloo" and device.type == "cuda":
        raise ValueError("gloo cannot send CUDA tensors between ranks: use an NCCL "
                         "process group for modules on GPUs")
    return mode


def open_transport(group, store, prefix: str, *, backend: str, device: torch.device,
                   mode: str = "auto", timeout: float = 300.0,
                   ring_bytes: Union[int, Callable[[], int]] = DEFAULT_RING_BYTES,
                   max_ctas: int | None = None) -> Connection:
    """Open the transport for this rank of ``group``, collectively with every rank of it.

    ``store`` (the group's store; ``None``: no shared memory) holds the agreement, under
    keys starting with ``prefix`` (unique per transport opened on the group, the same on
    every rank).  ``backend`` is the group's backend and ``device`` where the tensors
    live (checked with ``mode`` by :func:`check_mode`).  ``timeout`` (seconds) bounds the
    agreement and the private groups' setup; NCCL communicators get twice it as their
    watchdog timeout.  ``ring_bytes`` sizes each shared-memory ring (the same on every
    rank; a callable is called only when shared memory is tried, so a setting read from
    the environment is read only where it applies).  ``max_ctas``: NCCL's CTA cap
    (:func:`nccl_groups`).

    Raises ``ValueError`` for misuse or when ``mode="shm"`` cannot be honoured on some
    rank (each rank's reason), :class:`TransportSetupError` when another rank is
    missing, failed or exited (``timed_out`` after ``timeout``); never a transport's or
    the store's own exception."""
    check_mode(mode, backend, device)
    to = datetime.timedelta(seconds=float(timeout))
    rank, world = group.rank(), group.size()
    shm = pg = None
    try:
        if backend == "gloo" and device.type == "cpu" and store is not None:
            # collective: every rank agrees on shared memory (all on one host, extension
            # built) or on the private gloo group below
            try:
                shm = ShmP2P.create(store, prefix, rank, world, mode=_SHM_MODES[mode],
                                    timeout=timeout,
                                    ring_bytes=ring_bytes() if callable(ring_bytes) else ring_bytes)
            except ShmUnavailable as e:
                raise ValueError(str(e)) from e
        if shm is not None:
            name = "shm"
        elif backend == "gloo":
            name = "gloo"
            pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, world, to)
        elif backend == "nccl":  # unverified: no GPU has run this path yet
            name = "nccl"
            # the communicators' watchdog is a backstop behind the host-side deadlines
            # (overlap.p2p.Handle): twice the timeout, so that a hang is reported by those
            # deadlines on every rank, not by the watchdog tearing a process down
            pg = nccl_groups(store, prefix, rank, world, 2 * to, max_ctas)
        else:  # another backend: the caller's group carries the traffic itself
            name = str(backend)
    except (ValueError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - another rank is missing, gone or failed
        raise _setup_failure(e) from e
    if shm is not None:
        transport = shm
    else:
        transport = P2P(group) if pg is None else P2P(backend=pg, rank=rank)
    return Connection(name, transport, pg)


def _setup_failure(e: Exception) -> TransportSetupError:
    """``e``, raised while opening a transport, as a :class:`TransportSetupError` whose
    message says what failed (a store's or process group's error: its type and first
    line)."""
    if isinstance(e, PeerError):
        return TransportSetupError(str(e), isinstance(e, PeerTimeout))
    lines = str(e).strip().splitlines()
    first = lines[0][:200] if lines else ""
    return TransportSetupError(f"setting up the pipeline's communicators: "
                               f"{type(e).__name__}: {first}",
                               "imeout" in first or "imed out" in first)


def nccl_groups(store, prefix: str, rank: int, size: int, timeout: datetime.timedelta,
                max_ctas: int | None) -> tuple:
    """Two private NCCL communicators, ``(up, down)`` (see :class:`overlap.p2p.P2P`),
    with high-priority internal streams, ``timeout`` as their watchdog timeout and, when
    ``max_ctas`` is given, NCCL's CTA cap (``config.max_ctas``, see
    :func:`overlap.partition.nccl_process_group_options`; otherwise NCCL's default or
    ``$NCCL_MAX_CTAS``).  If the second cannot be made, the first is aborted."""
    from .partition import nccl_process_group_options
    made: list = []
    try:
        for direction in ("up", "down"):
            opts = nccl_process_group_options(max_ctas=max_ctas, high_priority_stream=True)
            opts._timeout = timeout
            made.append(dist.ProcessGroupNCCL(dist.PrefixStore(f"{prefix}/{direction}", store),
                                              rank, size, opts))
    except BaseException:
        release_groups(made, failed=True)
        raise
    return tuple(made)


def release_groups(groups, failed: bool) -> None:
    """Shut down private NCCL communicators (never raises: it may run from a
    finalizer).  After a failure ``abort()`` (pending transfers may never finish),
    otherwise ``shutdown()``; each falls back to the other names torch has used
    (``_shutdown`` before ``shutdown`` became public)."""
    names = ("abort", "shutdown", "_shutdown") if failed else ("shutdown", "_shutdown", "abort")
    for pg in groups:
        fn = next((getattr(pg, n) for n in names if callable(getattr(pg, n, None))), None)
        if fn is None:
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the communicator may be gone already
            log.debug("releasing the pipeline's NCCL communicator failed: %s", exc)
