"""Asynchronous pipeline point-to-point communication with a shape/dtype handshake.

:class:`P2P` wraps ``torch.distributed.isend/irecv`` for one process group:

* ranks are *group* ranks (converted to global ranks once, at construction);
* every send and receive returns a :class:`Handle` whose :meth:`Handle.wait` takes a
  timeout and, when the peer does not answer, raises :class:`PeerTimeout` naming the
  peer and what was being waited for, instead of hanging (on NCCL only waits that
  block the host have a deadline; the others are stream-ordered, see :class:`Handle`);
* what crosses a stage boundary is described by :class:`TensorMeta` records, packed
  into one small int64 tensor (:func:`pack_meta` / :func:`unpack_meta`, ``int64[META_LEN]``)
  so a receiver can allocate buffers for tensors whose shapes and dtypes it was never
  told; this wire format is the runtime's over either transport (docs/transport.md).

:class:`P2P` implements :class:`overlap.transport.Transport`, its :class:`Handle` is a
:class:`overlap.transport.TransferHandle`; the failures (:class:`PeerError` and its
subclasses) are those of :mod:`overlap.transport`, importable from here too.

The runtime posts receives ahead of the computation that needs them and waits only
when that computation starts; with gloo each operation runs on the backend's own
threads, so transfers overlap the compute of the calling thread.  With NCCL the
transfers run on the GPU and waiting on them is stream-ordered: the host never blocks
on a transfer except where it must read a result (see :class:`Handle` and
docs/transport.md, "Waiting on NCCL transfers").
"""

from __future__ import annotations

import contextlib
import datetime
import time
from typing import NamedTuple, Sequence

import torch
import torch.distributed as dist

from .transport import PeerAborted, PeerError, PeerExited, PeerLost, PeerTimeout, TransferHandle

__all__ = ["TensorMeta", "pack_meta", "unpack_meta", "Handle", "P2P", "PeerError", "PeerTimeout",
           "PeerLost", "PeerExited", "PeerAborted", "META_LEN"]

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64,
           torch.complex128]
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES.append(getattr(torch, _name))
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}

META_LEN = 64  # int64 words in a packed metadata message (up to ~10 tensors of rank 4)


class TensorMeta(NamedTuple):
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @staticmethod
    def of(t: torch.Tensor) -> "TensorMeta":
        return TensorMeta(tuple(t.shape), t.dtype, bool(t.requires_grad))

    def __str__(self) -> str:
        return f"{self.dtype}{list(self.shape)}{'(grad)' if self.requires_grad else ''}"


def pack_meta(metas: Sequence[TensorMeta], device: torch.device | str = "cpu") -> torch.Tensor:
    """Encode ``metas`` as ``int64[META_LEN]``: ``[n, (dtype, requires_grad, ndim, *shape) * n]``."""
    words = [len(metas)]
    for m in metas:
        if m.dtype not in _DTYPE_CODE:
            raise ValueError(f"cannot send tensors of dtype {m.dtype} between stages; "
                             f"supported: {[str(d) for d in _DTYPES]}")
        words += [_DTYPE_CODE[m.dtype], int(m.requires_grad), len(m.shape), *m.shape]
    if len(words) > META_LEN:
        raise ValueError(f"a stage boundary carries {len(metas)} tensors with "
                         f"{len(words)} metadata words; at most {META_LEN} fit: pass fewer "
                         "or lower-rank tensors between stages")
    out = torch.zeros(META_LEN, dtype=torch.int64)
    out[: len(words)] = torch.tensor(words, dtype=torch.int64)
    if torch.device(device).type == "cuda":
        # from pinned memory without blocking: a pageable copy would synchronize the
        # current stream (the caching host allocator keeps the buffer until the copy ran)
        return out.pin_memory().to(device, non_blocking=True)
    return out.to(device)


def unpack_meta(t: torch.Tensor) -> list[TensorMeta]:
    words = t.tolist()
    n, i, out = words[0], 1, []
    for _ in range(n):
        code, rg, nd = words[i], words[i + 1], words[i + 2]
        out.append(TensorMeta(tuple(words[i + 3: i + 3 + nd]), _DTYPES[code], bool(rg)))
        i += 3 + nd
    return out


class Handle(TransferHandle):
    """Pending transfers of one send, receive or all_gather; :meth:`wait` returns the
    tensors or raises a :class:`~overlap.transport.PeerError` (the
    :class:`~overlap.transport.TransferHandle` of :class:`P2P`).

    A handle is one of two kinds, fixed when it is made (``stream_ordered``; :class:`P2P`
    sets it from the backend: ``True`` for NCCL moving CUDA tensors, else ``False``):

    *host-ordered* (gloo, and the CPU transports of :mod:`overlap.shm`)
        The data moves on the backend's own threads.  :meth:`wait` blocks the calling
        thread until it has moved, and raises :class:`PeerTimeout` after ``timeout``.
    *stream-ordered* (NCCL on CUDA tensors)
        The data moves in kernels on ProcessGroupNCCL's internal stream.  ``wait()``
        calls ``Work.wait()`` *without* a timeout, which makes the current CUDA stream
        wait for the transfer's completion event and returns at once: the host never
        blocks, kernels queued on the current stream afterwards run once the data is
        there, and the host can queue work ahead.  (``Work.wait(timeout)`` would block
        the host until the transfer finished, at every receive, send release and drain,
        which defeats the overlap.)  No deadline applies inside such a wait; a transfer
        that never completes is caught either by a later host-side check (``host=True``,
        below, e.g. the runtime's end-of-step agreement, whose kernels queue behind
        everything the step waited for) or by the process group's own timeout (its
        watchdog).  ``abort`` is not consulted: nothing blocks.

    ``wait(timeout, abort, host=True)`` is for the few points where the *host* must
    know the transfer has finished (values read on the host, the step agreement).
    Host-ordered handles wait as above.  Stream-ordered handles poll
    ``Work.is_completed()`` (a non-blocking event query) until ``timeout`` runs out
    (:class:`PeerTimeout`), checking ``abort`` every 20 ms (:class:`PeerAborted`), then
    return the tensors copied to the host on a private stream, so reading them never
    waits for unrelated work queued on the current stream.
    """

    __slots__ = ("works", "stream_ordered")  # + TransferHandle's tensors, what, peer, done

    def __init__(self, works, tensors, what: str, peer: int, stream_ordered: bool = False):
        self.works, self.tensors, self.what, self.peer = works, tensors, what, peer
        self.done = not works
        self.stream_ordered = bool(stream_ordered)

    def is_completed(self) -> bool:
        if not self.done:
            self.done = all(w.is_completed() for w in self.works)
        return self.done

    def wait(self, timeout: datetime.timedelta, abort=None, *,
             host: bool = False) -> list[torch.Tensor]:
        """The transferred tensors, once they are usable (see the class docstring).

        Args:
            timeout: the longest a host-side wait may take.
            abort: a callable returning a failure message or ``None``; host-side waits
                poll instead of blocking and raise :class:`PeerAborted` as soon as it
                returns a message (for waits a failure elsewhere might never end).
            host: the host needs the transfer finished (stream-ordered handles only:
                poll with the deadline, return host copies).
        """
        if self.stream_ordered:
            if host:
                return self._wait_host(timeout, abort)
            if not self.done:
                for w in self.works:
                    try:
                        w.wait()  # no timeout: the current stream waits, the host does not
                    except RuntimeError as e:
                        raise _peer_error(e, self, timeout) from e
                self.done = True
            return self.tensors
        if not self.done and abort is not None:
            self._poll(timeout, abort)
        if not self.done:
            for w in self.works:
                try:
                    ok = w.wait(timeout)
                except RuntimeError as e:  # gloo raises on timeout and on a closed peer
                    raise _peer_error(e, self, timeout) from e
                if ok is False:
                    raise PeerTimeout(f"{self.what}: rank {self.peer} did not answer within "
                                      f"{timeout.total_seconds():g} s", self.peer, self.what)
            self.done = True
        return self.tensors

    def _wait_host(self, timeout: datetime.timedelta, abort) -> list[torch.Tensor]:
        """Stream-ordered handle, the host must know: poll with the deadline, copy out.
        (Polled even after an earlier stream-ordered wait: that one only ordered a
        stream, it does not mean the transfer has finished.)"""
        self._poll(timeout, abort)  # returns at once when the transfer is complete
        device = next((t.device for t in self.tensors if t.is_cuda), None)
        with torch.cuda.stream(torch.cuda.Stream(device=device)) if device is not None \
                else contextlib.nullcontext():
            for w in self.works:  # complete: orders only this (private) stream after it
                try:
                    w.wait()
                except RuntimeError as e:
                    raise _peer_error(e, self, timeout) from e
            self.done = True
            if device is None:
                return self.tensors
            return [t.to("cpu") for t in self.tensors]  # synchronizes that stream only

    def _poll(self, timeout: datetime.timedelta, abort) -> None:
        now = time.monotonic()
        deadline, next_check, delay = now + timeout.total_seconds(), now + 0.02, 20e-6
        while not all(w.is_completed() for w in self.works):
            now = time.monotonic()
            if now >= deadline:
                raise PeerTimeout(f"{self.what}: no answer within "
                                  f"{timeout.total_seconds():g} s", self.peer, self.what)
            if abort is not None and now >= next_check:
                msg = abort()
                if msg is not None:
                    raise PeerAborted(msg, self.peer, self.what)
                next_check = now + 0.02
            time.sleep(delay)
            delay = min(delay * 2, 2e-4)


def _is_nccl(backend) -> bool:
    cls = getattr(dist, "ProcessGroupNCCL", None) if dist.is_available() else None
    return cls is not None and isinstance(backend, cls)


def _peer_error(e: RuntimeError, h: Handle, timeout: datetime.timedelta) -> PeerError:
    """The :class:`PeerError` for a backend's exception while waiting on ``h``."""
    text = str(e)
    if "imed out" in text or "imeout" in text and "closure" not in text:
        return PeerTimeout(f"{h.what}: rank {h.peer} did not answer within "
                           f"{timeout.total_seconds():g} s", h.peer, h.what)
    return _lost(e, h.what, h.peer)


def _lost(e: RuntimeError, what: str, peer: int) -> PeerLost:
    """The :class:`PeerLost` for a transfer with ``peer`` whose connection failed."""
    return PeerLost(f"{what}: the connection failed ({_short(e)})", peer, what)


def _short(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return s[0][:200] if s else type(e).__name__


class P2P:
    """Point-to-point transfers among the ranks of a process group.

    Either ``group`` (a registered process group, ``None`` = the default one), whose
    group ranks are converted to global ranks once; or ``backend``, a process-group
    backend object used directly (``send``/``recv``/``allgather`` with group ranks),
    such as the private gloo group the pipeline runtime creates for itself; or a pair
    ``(up, down)`` of backends with this process's group ``rank``: messages to higher
    ranks travel on ``up``, to lower ranks on ``down``, so that on a transport whose
    operations between two ranks run in order (NCCL) a receive posted ahead never
    blocks a send in the other direction.

    Handles of transfers of CUDA tensors on NCCL are stream-ordered (see
    :class:`Handle`), all others host-ordered.  ``nccl`` overrides the detection (whether
    CUDA tensors travel on NCCL), for backends this class cannot recognise.
    """

    # nothing to drive between compute actions: the backend's threads (gloo) or the GPU
    # (NCCL) move the data (overlap.shm.ShmP2P.poll is the counterpart that has work to do)
    needs_poll = False

    def poll(self) -> None:
        """Nothing to do (:attr:`needs_poll` is ``False``): the backend moves the data."""

    def __init__(self, group: dist.ProcessGroup | None = None, backend=None,
                 rank: int | None = None, *, nccl: bool | None = None):
        self.backend = backend
        self.rank = rank
        if backend is None:
            self.group = group if group is not None else dist.distributed_c10d._get_default_group()
            n = self.group.size()
            self._global = [dist.get_global_rank(self.group, i) for i in range(n)]
            if nccl is None:  # "nccl", or e.g. "cpu:gloo,cuda:nccl": CUDA tensors on NCCL
                nccl = "nccl" in str(dist.get_backend(self.group))
        else:
            self.group = None
            if isinstance(backend, tuple) and rank is None:
                raise ValueError("P2P with (up, down) backends needs this rank's group rank")
            if nccl is None:
                nccl = _is_nccl(backend[0] if isinstance(backend, tuple) else backend)
        self._nccl = bool(nccl)

    def _ordered(self, tensors: Sequence[torch.Tensor]) -> bool:
        """Whether the transfer of ``tensors`` is stream-ordered (NCCL, CUDA tensors)."""
        return self._nccl and bool(tensors) and tensors[0].is_cuda

    def _backend(self, src: int, dst: int):
        b = self.backend
        if isinstance(b, tuple):  # (to higher ranks, to lower ranks): one direction each
            return b[0] if dst > src else b[1]
        return b

    def isend(self, tensors: Sequence[torch.Tensor], peer: int, what: str, tag: int = 0) -> Handle:
        if self.backend is not None:
            be = self._backend(self.rank, peer)
            return self._post(lambda t: be.send([t.detach()], peer, tag), tensors, what, peer)
        g, dst = self.group, self._global[peer]
        return self._post(lambda t: dist.isend(t.detach(), dst, group=g, tag=tag), tensors,
                          what, peer)

    def irecv(self, buffers: Sequence[torch.Tensor], peer: int, what: str, tag: int = 0) -> Handle:
        if self.backend is not None:
            be = self._backend(peer, self.rank)
            return self._post(lambda t: be.recv([t], peer, tag), buffers, what, peer)
        g, src = self.group, self._global[peer]
        return self._post(lambda t: dist.irecv(t, src, group=g, tag=tag), buffers, what, peer)

    def _post(self, start, tensors: Sequence[torch.Tensor], what: str, peer: int) -> Handle:
        """A handle over ``start(t)`` for each tensor.  gloo refuses to post on a
        connection that closed: that is :class:`PeerLost`, not chained to gloo's
        exception, whose frames would keep the posted transfers (and so the backend's
        connections) alive."""
        works = []
        try:
            for t in tensors:
                works.append(start(t))
        except RuntimeError as e:
            err = _lost(e, what, peer)
        else:
            return Handle(works, list(tensors), what, peer, self._ordered(tensors))
        works.clear()
        raise err

    def close(self, failed: bool = False) -> None:
        """Nothing to release here: the owner of the backend drops it (for gloo that
        closes the connections, which ends every peer's pending transfer)."""

    def all_gather(self, t: torch.Tensor, world: int, what: str) -> Handle:
        """Every rank's ``t``, in group-rank order."""
        out = [torch.empty_like(t) for _ in range(world)]
        if self.backend is not None:
            be = self.backend[0] if isinstance(self.backend, tuple) else self.backend
            work = be.allgather([out], [t])
        else:
            work = dist.all_gather(out, t, group=self.group, async_op=True)
        return Handle([work], out, what, -1, self._ordered(out))
