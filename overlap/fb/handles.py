"""Asynchronous communication handles: :class:`CommHandle` and :func:`run_async`.

A ``comm`` sub-stage's forward and backward each return a :class:`CommHandle`; the
programs of :mod:`overlap.fb.programs` wait on it where the result is needed.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any, Callable, Sequence

import torch

from ..streams import StreamEvent

log = logging.getLogger(__name__)

Tensors = tuple[torch.Tensor, ...]


def _as_tensors(value: Any, what: str, allow_none: bool = False) -> Tensors:
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)) and all(
            isinstance(v, torch.Tensor) or (allow_none and v is None) for v in value):
        return tuple(value)
    raise TypeError(f"{what} must be a tensor or a tuple/list of tensors"
                    f"{' (None allowed)' if allow_none else ''}, got "
                    f"{type(value).__name__}" + (
                        f" containing {sorted({type(v).__name__ for v in value})}"
                        if isinstance(value, (tuple, list)) else ""))


class CommHandle:
    """A communication in flight; :meth:`wait` returns its result tensors.

    ``stream_ordered=True`` means :meth:`wait` only makes the *current CUDA stream* wait
    (NCCL work on CUDA tensors, a kernel followed by an event): it never blocks the host,
    so the F&B driver calls it right after the launch, on the communication stream.
    Otherwise :meth:`wait` blocks the host until the data is there (gloo, thread pools)
    and is called only when the result is needed.  ``on_done(callback)``, if given,
    registers a no-argument callback run when the communication completes (used to time
    it on the host clock).

    Build one with :meth:`from_work`, :meth:`from_future`, :meth:`from_event`,
    :meth:`ready`, or :func:`run_async`.
    """

    __slots__ = ("_wait", "_result", "stream_ordered", "_on_done")

    def __init__(self, wait: Callable[[], Any], *, stream_ordered: bool = False,
                 on_done: Callable[[Callable[[], None]], None] | None = None) -> None:
        if not callable(wait):
            raise TypeError(f"CommHandle needs a callable wait, got {type(wait).__name__}")
        self._wait = wait
        self._result: Tensors | None = None
        self.stream_ordered = bool(stream_ordered)
        self._on_done = on_done

    def wait(self) -> Tensors:
        """The result tensors (waits once; later calls return the same tuple)."""
        if self._result is None:
            # None entries: a backward communication's "no gradient for this input"
            self._result = _as_tensors(self._wait(), "the result of a communication",
                                       allow_none=True)
            self._wait = None  # drop references held by the closure
        return self._result

    def add_done_callback(self, fn: Callable[[], None]) -> bool:
        """Run ``fn()`` when the communication completes; ``False`` if this handle cannot
        tell (then the caller times it at :meth:`wait`)."""
        if self._on_done is None:
            return False
        try:
            self._on_done(fn)
        except Exception as e:  # noqa: BLE001 - timing is best effort
            log.debug("cannot register a completion callback: %s", e)
            return False
        return True

    @classmethod
    def ready(cls, outputs: torch.Tensor | Sequence[torch.Tensor]) -> "CommHandle":
        """A communication that has already finished (e.g. a single-rank no-op)."""
        outs = _as_tensors(outputs, "outputs")
        return cls(lambda: outs, on_done=lambda fn: fn())

    @classmethod
    def from_work(cls, work: Any, outputs: torch.Tensor | Sequence[torch.Tensor]) -> "CommHandle":
        """Wrap the ``Work`` returned by a ``torch.distributed`` call with ``async_op=True``
        whose results land in ``outputs`` (e.g. the output buffer of
        ``all_to_all_single``).  Stream-ordered when the outputs are CUDA tensors (NCCL)."""
        if not hasattr(work, "wait"):
            raise TypeError(f"from_work() takes the Work returned by a torch.distributed call "
                            f"with async_op=True, got {type(work).__name__}")
        outs = _as_tensors(outputs, "outputs")

        def wait() -> Tensors:
            work.wait()
            return outs

        def on_done(fn: Callable[[], None]) -> None:
            work.get_future().add_done_callback(lambda _f: fn())

        return cls(wait, stream_ordered=any(t.is_cuda for t in outs), on_done=on_done)

    @classmethod
    def from_future(cls, future: Any) -> "CommHandle":
        """Wrap a ``concurrent.futures.Future`` or ``torch.futures.Future`` whose result is
        a tensor or a tuple of tensors (host-ordered: :meth:`wait` blocks)."""
        if hasattr(future, "result") and hasattr(future, "add_done_callback"):
            wait = future.result
        elif hasattr(future, "wait") and hasattr(future, "add_done_callback"):
            wait = future.wait
        else:
            raise TypeError(f"from_future() takes a concurrent.futures.Future or a "
                            f"torch.futures.Future, got {type(future).__name__}")
        return cls(wait, on_done=lambda fn: future.add_done_callback(lambda _f: fn()))

    @classmethod
    def from_event(cls, event: StreamEvent,
                   outputs: torch.Tensor | Sequence[torch.Tensor]) -> "CommHandle":
        """A communication made of kernels already queued on a stream, followed by
        ``event`` (DeepEP style): waiting makes the current stream wait for the event."""
        if not isinstance(event, StreamEvent):
            raise TypeError(f"from_event() takes a StreamEvent, got {type(event).__name__}")
        outs = _as_tensors(outputs, "outputs")

        def wait() -> Tensors:
            event.current_stream_wait()
            return outs

        return cls(wait, stream_ordered=event.event is not None)


_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def run_async(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> CommHandle:
    """Run ``fn(*args, **kwargs)`` (returning a tensor or tuple of tensors) on a shared
    background thread pool and return its handle: a single-process stand-in for a
    communication (tests, CPU emulation).  The pool (4 threads) is created on first use."""
    global _pool
    if not callable(fn):
        raise TypeError(f"run_async() takes a callable, got {type(fn).__name__}")
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=4, thread_name_prefix="overlap-comm")
    return CommHandle.from_future(_pool.submit(fn, *args, **kwargs))
