"""Deferred weight gradients (the zero-bubble ``W`` work): one store for the whole process.

:class:`WeightGradStore` keeps the published DualPipe API that custom autograd functions
are written against (``enabled``, ``cache``, ``funcs_queue``, ``put``, ``flush``, ``pop``,
``clear``): while ``WeightGradStore.enabled`` is true, a backward that supports deferral
calls ``WeightGradStore.put(fn)`` with a closure computing its weight gradient instead of
computing it; :func:`defer_weight_grad` does exactly that for you (or runs the closure at
once when the store is off).  Whoever turned the store on takes the closures collected
since (:meth:`WeightGradStore.take`) and runs them later:

* an overlapped pair, around the input-gradient step of a ``split_weight_grad`` sub-stage
  (:class:`_CollectWeightGrads`): they run at that sub-stage's ``W`` step;
* a pipeline runtime, around an input-gradient-only backward (an ``I`` action): they run
  in the matching ``W`` action (``dualpipe.WeightGradStore`` is this class);
* user code that calls ``flush``/``pop`` itself gets the published first-in first-out
  behaviour.

The store is class-level and process-wide, not thread-local: autograd runs CUDA backward
functions on its own threads, where a thread-local would not be seen.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable


class WeightGradStore:
    """Collects weight-gradient closures while ``enabled`` (class-level, as published:
    custom autograd functions refer to the class itself)."""

    enabled: bool = False
    cache: list[Callable[[], None]] = []
    funcs_queue: deque = deque()

    @classmethod
    def put(cls, func: Callable[[], None]) -> None:
        """Record ``func`` (no arguments) to run in a later weight pass."""
        cls.cache.append(func)

    @classmethod
    def flush(cls) -> None:
        """Close the current group of closures and queue it (first in, first out)."""
        cls.funcs_queue.append(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        """Run the oldest queued group."""
        if not cls.funcs_queue:
            raise RuntimeError("WeightGradStore.pop(): no flushed group of weight-gradient "
                               "closures is queued; call flush() after a deferred backward")
        for f in cls.funcs_queue.popleft():
            f()

    @classmethod
    def take(cls) -> list[Callable[[], None]]:
        """Return and forget the closures put since the last flush/take (runtime use)."""
        out, cls.cache = cls.cache, []
        return out

    @classmethod
    def clear(cls) -> None:
        cls.enabled = False
        cls.cache = []
        cls.funcs_queue = deque()


def defer_weight_grad(fn: Callable[[], None]) -> None:
    """Call from a custom autograd ``backward`` with a closure computing a weight gradient.

    While :class:`WeightGradStore` is enabled the closure goes there: inside the
    input-gradient step of a ``split_weight_grad`` sub-stage it then runs at that
    sub-stage's ``W`` step, inside a pipeline runtime's zero-bubble ``I`` action in the
    matching ``W`` action.  Otherwise it runs now.
    """
    if WeightGradStore.enabled:
        WeightGradStore.put(fn)
        return
    fn()


class _CollectWeightGrads:
    """Collect the weight-gradient closures put into :class:`WeightGradStore` inside the
    block (the list returned by ``__enter__`` is filled on exit); the store's state from
    before (on or off, closures an enclosing pass had collected) is restored on exit."""

    __slots__ = ("bucket", "prev")

    def __enter__(self) -> list[Callable[[], None]]:
        self.bucket: list[Callable[[], None]] = []
        self.prev = (WeightGradStore.enabled, WeightGradStore.take())
        WeightGradStore.enabled = True
        return self.bucket

    def __exit__(self, *exc: Any) -> None:
        self.bucket.extend(WeightGradStore.take())
        enabled, cache = self.prev
        for f in cache:
            WeightGradStore.put(f)
        WeightGradStore.enabled = enabled
