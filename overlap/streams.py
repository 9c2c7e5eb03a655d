"""Compute and communication streams with priorities, events to order them, and a CPU twin.

One :class:`StreamPair` per device gives the two queues an overlapped forward+backward
runs on:

``compute``
    The stream the model's kernels run on.  By default it is *whatever stream is current*
    on the device when it is used (usually the default stream), so autograd, which runs
    each backward kernel on the stream of its forward kernel, sees the same stream as a
    plain training loop.  Ask for a dedicated one with ``compute_priority=``.
``comm``
    A dedicated stream for communication kernels (all-to-all dispatch/combine, pipeline
    send/recv), created with the device's **highest** priority by default, as DeepSeek-V3
    and DeepEP do, so a ready communication kernel is scheduled before queued compute
    blocks.  Priorities only order *pending* blocks: they never preempt a running kernel
    and do not affect copy-engine copies.

On a CPU device the pair is a *twin* with the same interface: its streams are
:class:`HostStream` objects on which nothing is queued (the host runs the work when it is
issued), and every :class:`StreamEvent` is already complete.  Code written against a
:class:`StreamPair` therefore runs unchanged on CPU and CUDA.  CUDA is probed lazily,
when a pair is created for a CUDA device, never at import.

Rules for work that crosses streams
-----------------------------------
1. **Order.**  Before a stream reads a tensor produced on another stream it must wait for
   an event recorded after the producing kernel: ``pair.on("comm")`` does this by default
   (the comm stream waits for everything issued so far on the stream that was current),
   and the consumer of a communication result waits on the event recorded after it
   (``pair.wait(event)`` or ``with event:``).
2. **Lifetime.**  A tensor *allocated* on stream A and *used* on stream B must be handed
   over with ``pair.handoff(tensor, to=B)`` (``Tensor.record_stream``) before its last
   Python reference can be dropped; otherwise the caching allocator may give its memory to
   a new tensor on A while B still reads it.  In an overlapped pair that means: the
   inputs of a communication kernel are handed to ``"comm"``, its outputs to
   ``"compute"``.  Alternatively keep the tensors alive in ``StreamEvent.extra_tensors``
   until the event has been waited on (the CUDA-graph-friendly way).
3. **Join.**  Leave a block with work on another stream only after the caller's stream
   waits for it (``on(..., join=True)``), so later kernels on the caller's stream see it.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Literal, Sequence, Union

import torch

__all__ = [
    "HostStream", "StreamEvent", "StreamPair", "priority_range", "resolve_device",
]

log = logging.getLogger(__name__)

Which = Literal["compute", "comm"]
StreamLike = Union["torch.cuda.Stream", "HostStream"]
Priority = Union[int, Literal["high", "low"]]


def resolve_device(device: torch.device | str | int | None = None) -> torch.device:
    """Normalise ``device``: ``None`` is the current CUDA device when CUDA is available, else
    the CPU; an ``int`` is a CUDA ordinal.  Only ``cpu`` and ``cuda`` devices are supported."""
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if isinstance(device, int):
        device = torch.device("cuda", device)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {dev} was requested but CUDA is not available in this "
                               "process: pass device='cpu' (the host twin) or run on a GPU")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        return dev
    if dev.type == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device {dev} is not supported: streams exist for 'cuda' devices and "
                     "have a host twin for 'cpu'")


def priority_range(device: torch.device | str | int | None = None) -> tuple[int, int]:
    """``(lowest, highest)`` stream priority of ``device``; a lower number is a higher
    priority on CUDA (typically ``(0, -5)``).  ``(0, 0)`` on the CPU."""
    dev = resolve_device(device)
    if dev.type != "cuda":
        return (0, 0)
    lo, hi = torch.cuda.Stream.priority_range()
    return int(lo), int(hi)


class HostStream:
    """The CPU twin of a CUDA stream: nothing is queued, the host runs work when issued,
    so every wait is a no-op and every query is ``True``."""

    __slots__ = ("name", "priority")
    device = torch.device("cpu")

    def __init__(self, name: str, priority: int = 0) -> None:
        self.name = name
        self.priority = priority

    def synchronize(self) -> None:
        """Nothing is pending on a host stream."""

    def query(self) -> bool:
        return True

    def wait_stream(self, other: Any) -> None:
        """No-op: host work is already complete when issued."""

    def wait_event(self, event: Any) -> None:
        """No-op: host events are always complete."""

    def __repr__(self) -> str:
        return f"HostStream({self.name!r})"


class StreamEvent:
    """A point on a stream that other streams (or the host) can wait for.

    DeepEP style: the object is also a context manager, so work issued inside the block
    overlaps with whatever the event marks, and the current stream waits for the event on
    exit::

        ev = pair.record("comm")          # after launching a communication kernel
        with ev:
            run_unrelated_compute()       # overlaps with the communication
        use(result_of_the_communication)  # safe: the current stream waited on exit

    ``event`` is a ``torch.cuda.Event``, or ``None`` for an event that is already complete
    (every event of the CPU twin).  ``extra_tensors`` are kept alive until the event has
    been waited on (rule 2 of the module docstring, without ``record_stream``).
    """

    __slots__ = ("event", "extra_tensors")

    def __init__(self, event: "torch.cuda.Event | None" = None,
                 extra_tensors: Sequence[torch.Tensor] = ()) -> None:
        self.event = event
        self.extra_tensors = tuple(extra_tensors)

    @classmethod
    def completed(cls, extra_tensors: Sequence[torch.Tensor] = ()) -> "StreamEvent":
        """An event that is already complete (the CPU twin's events)."""
        return cls(None, extra_tensors)

    def query(self) -> bool:
        """Whether all work before the event has finished (never blocks)."""
        return self.event is None or bool(self.event.query())

    def synchronize(self) -> None:
        """Block the host until the event is reached."""
        if self.event is not None:
            self.event.synchronize()

    def wait(self, stream: StreamLike | None = None) -> None:
        """Make ``stream`` (default: the current stream) wait for the event, without
        blocking the host; then release ``extra_tensors``."""
        if self.event is not None:
            if stream is None:
                stream = torch.cuda.current_stream(self._device())
            if not isinstance(stream, HostStream):
                stream.wait_event(self.event)
        self.extra_tensors = ()

    def current_stream_wait(self) -> None:
        """DeepEP's name for :meth:`wait` on the current stream."""
        self.wait(None)

    def elapsed_s(self, end: "StreamEvent") -> float:
        """Seconds from this event to ``end`` (both recorded with timing enabled and
        complete); ``0.0`` for host events."""
        if self.event is None or end.event is None:
            return 0.0
        return self.event.elapsed_time(end.event) / 1e3

    def _device(self) -> torch.device | None:
        dev = getattr(self.event, "device", None)
        return dev if isinstance(dev, torch.device) else None

    def __enter__(self) -> "StreamEvent":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wait(None)

    def __repr__(self) -> str:
        return f"StreamEvent({'complete' if self.event is None else self.event})"


class _NoOp:
    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NOOP = _NoOp()


class StreamPair:
    """A compute stream and a communication stream on one device (see the module docs).

    Build one with :meth:`create` (new streams, explicit priorities) or take the cached
    per-device default with :meth:`for_device`.  On the CPU both streams are
    :class:`HostStream` twins and every method is a cheap no-op with the same meaning.
    """

    def __init__(self, device: torch.device, comm: StreamLike,
                 compute: StreamLike | None, comm_priority: int,
                 compute_priority: int | None) -> None:
        # use create()/for_device(); this stores already-validated parts
        self.device = device
        self._comm = comm
        self._compute = compute  # None: the device's current stream at the time of use
        self.comm_priority = comm_priority
        self.compute_priority = compute_priority

    # -- construction -----------------------------------------------------------------
    @classmethod
    def create(cls, device: torch.device | str | int | None = None, *,
               comm_priority: Priority = "high",
               compute_priority: Priority | None = None) -> "StreamPair":
        """New streams on ``device`` (default: the current CUDA device, else the CPU).

        ``comm_priority``: ``"high"`` (default: the device's highest priority), ``"low"``
        or an int inside :func:`priority_range`.  ``compute_priority``: ``None`` (default)
        uses the device's *current* stream for compute, whatever it is at the time of use;
        otherwise a dedicated compute stream with that priority is created.  Raises
        ``ValueError`` for a priority outside the device's range.
        """
        dev = resolve_device(device)
        if dev.type != "cuda":
            comm = HostStream("comm")
            compute = None if compute_priority is None else HostStream("compute")
            return cls(dev, comm, compute, 0, None if compute_priority is None else 0)
        lo, hi = priority_range(dev)
        cp = _priority(comm_priority, lo, hi, "comm_priority")
        comm = torch.cuda.Stream(device=dev, priority=cp)
        if compute_priority is None:
            compute, kp = None, None
        else:
            kp = _priority(compute_priority, lo, hi, "compute_priority")
            compute = torch.cuda.Stream(device=dev, priority=kp)
        log.debug("StreamPair on %s: comm priority %d, compute %s (range low=%d high=%d)",
                  dev, cp, "current stream" if kp is None else f"priority {kp}", lo, hi)
        return cls(dev, comm, compute, cp, kp)

    _cache: dict[torch.device, "StreamPair"] = {}
    _cache_lock = threading.Lock()

    @classmethod
    def for_device(cls, device: torch.device | str | int | None = None) -> "StreamPair":
        """The process-wide default pair of ``device`` (created on first use with the
        default priorities, then reused, so all overlapped pairs of a device share one
        communication stream)."""
        dev = resolve_device(device)
        with cls._cache_lock:
            pair = cls._cache.get(dev)
            if pair is None:
                pair = cls._cache[dev] = cls.create(dev)
        return pair

    # -- streams ----------------------------------------------------------------------
    @property
    def is_cuda(self) -> bool:
        """``True`` for a CUDA pair, ``False`` for the CPU twin."""
        return self.device.type == "cuda"

    @property
    def comm(self) -> StreamLike:
        """The communication stream."""
        return self._comm

    @property
    def compute(self) -> StreamLike:
        """The compute stream (the device's current stream unless a dedicated one exists)."""
        if self._compute is not None:
            return self._compute
        if self.is_cuda:
            return torch.cuda.current_stream(self.device)
        return _HOST_CURRENT

    def stream(self, which: Which | StreamLike) -> StreamLike:
        """``"compute"`` / ``"comm"`` -> the stream; a stream object is returned as is."""
        if which == "comm":
            return self._comm
        if which == "compute":
            return self.compute
        if isinstance(which, HostStream) or (self.is_cuda
                                             and isinstance(which, torch.cuda.Stream)):
            return which
        raise ValueError(f"unknown stream {which!r}: use 'compute', 'comm' or a stream object")

    def current(self) -> StreamLike:
        """The stream current on this pair's device right now."""
        return torch.cuda.current_stream(self.device) if self.is_cuda else _HOST_CURRENT

    # -- ordering -----------------------------------------------------------------------
    def record(self, which: Which | StreamLike | None = None,
               extra_tensors: Sequence[torch.Tensor] = (), *,
               timing: bool = False) -> StreamEvent:
        """Record an event on ``which`` (default: the current stream) after the work
        issued so far; ``timing=True`` makes it usable with :meth:`StreamEvent.elapsed_s`.
        Always complete on the CPU twin."""
        if not self.is_cuda:
            return StreamEvent(None, extra_tensors)
        s = self.current() if which is None else self.stream(which)
        ev = torch.cuda.Event(enable_timing=timing)
        ev.record(s)
        return StreamEvent(ev, extra_tensors)

    def wait(self, event: StreamEvent, which: Which | StreamLike | None = "compute") -> None:
        """Make ``which`` (default ``"compute"``; ``None``: the current stream) wait for
        ``event`` without blocking the host."""
        if not isinstance(event, StreamEvent):
            raise TypeError(f"wait() takes a StreamEvent (from StreamPair.record), got "
                            f"{type(event).__name__}")
        if event.event is None or not self.is_cuda:
            event.extra_tensors = ()
            return
        event.wait(self.current() if which is None else self.stream(which))

    @contextmanager
    def _on_cuda(self, target: "torch.cuda.Stream", wait_for: Any,
                 join: bool) -> Iterator[StreamLike]:
        prev = torch.cuda.current_stream(self.device)
        if wait_for == "current":
            if target != prev:
                target.wait_stream(prev)
        elif isinstance(wait_for, StreamEvent):
            wait_for.wait(target)
        with torch.cuda.stream(target):
            yield target
        if join and target != prev:
            prev.wait_stream(target)

    def on(self, which: Which | StreamLike, *,
           wait_for: Literal["current"] | StreamEvent | None = "current",
           join: bool = False):
        """Context manager: issue the block on ``which``.

        ``wait_for="current"`` (default) first makes the target wait for everything
        issued so far on the stream that was current (so the block sees its inputs);
        a :class:`StreamEvent` waits for that event only; ``None`` adds no wait.
        ``join=True`` makes the previously current stream wait for the block's work on
        exit.  On the CPU twin this is a no-op context manager.
        """
        if wait_for not in ("current", None) and not isinstance(wait_for, StreamEvent):
            raise ValueError(f"wait_for must be 'current', a StreamEvent or None, got {wait_for!r}")
        target = self.stream(which)
        if not self.is_cuda:
            return _NOOP
        return self._on_cuda(target, wait_for, join)

    # -- lifetime -----------------------------------------------------------------------
    def handoff(self, tensors: torch.Tensor | Iterable[torch.Tensor | None] | None,
                to: Which | StreamLike) -> None:
        """Tell the caching allocator that ``tensors`` are used on stream ``to``
        (``Tensor.record_stream``), so their memory is not reused before the work queued
        on ``to`` so far has finished.  Accepts a tensor or an iterable (``None`` entries
        are skipped); no-op for CPU tensors and on the CPU twin."""
        if not self.is_cuda or tensors is None:
            return
        s = self.stream(to)
        if isinstance(tensors, torch.Tensor):
            tensors = (tensors,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(s)

    def synchronize(self) -> None:
        """Block the host until both streams are idle."""
        if self.is_cuda:
            self._comm.synchronize()
            self.compute.synchronize()

    def __repr__(self) -> str:
        if not self.is_cuda:
            return "StreamPair(cpu twin)"
        comp = "current" if self.compute_priority is None else f"priority={self.compute_priority}"
        return f"StreamPair({self.device}, comm priority={self.comm_priority}, compute {comp})"


_HOST_CURRENT = HostStream("current")


def _priority(value: Priority, lo: int, hi: int, name: str) -> int:
    if value == "high":
        return hi
    if value == "low":
        return lo
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be 'high', 'low' or an int, got {value!r}")
    if not min(lo, hi) <= value <= max(lo, hi):
        raise ValueError(f"{name}={value} is outside this device's priority range: use an int "
                         f"from {hi} (highest) to {lo} (lowest), or 'high'/'low'")
    return value
