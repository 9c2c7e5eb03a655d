"""Deferred weight gradients: :func:`defer_weight_grad` and the collector an overlapped
pair's ``B`` step runs a ``split_weight_grad`` sub-stage's backward under."""

from __future__ import annotations

import sys
from typing import Any, Callable

_wg_bucket: list[Callable[[], None]] | None = None  # process-wide: autograd runs CUDA
# backward functions on its own threads, so a thread-local would not be seen there.


def _weight_grad_store() -> Any:
    """dualpipe's WeightGradStore when that module is loaded (no import dependency)."""
    mod = sys.modules.get("dualpipe.weight_grad")
    store = getattr(mod, "WeightGradStore", None) if mod is not None else None
    if store is None or not all(hasattr(store, a) for a in ("enabled", "put", "take")):
        return None
    return store


def defer_weight_grad(fn: Callable[[], None]) -> None:
    """Call from a custom autograd ``backward`` with a closure computing a weight gradient.

    Inside the input-gradient step of a ``split_weight_grad`` sub-stage the closure is
    kept and run at that sub-stage's ``W`` step; when dualpipe's ``WeightGradStore`` is
    enabled (a zero-bubble ``I`` action) it goes there; otherwise it runs now.
    """
    if _wg_bucket is not None:
        _wg_bucket.append(fn)
        return
    store = _weight_grad_store()
    if store is not None and store.enabled:
        store.put(fn)
        return
    fn()


class _CollectWeightGrads:
    """Collect deferred weight-gradient closures (ours and WeightGradStore's)."""

    __slots__ = ("bucket", "prev", "store", "store_prev")

    def __enter__(self) -> list[Callable[[], None]]:
        global _wg_bucket
        self.bucket: list[Callable[[], None]] = []
        self.prev = _wg_bucket
        _wg_bucket = self.bucket
        self.store = _weight_grad_store()
        if self.store is not None:
            self.store_prev = (self.store.enabled, self.store.take())
            self.store.enabled = True
        return self.bucket

    def __exit__(self, *exc: Any) -> None:
        global _wg_bucket
        _wg_bucket = self.prev
        if self.store is not None:
            self.bucket.extend(self.store.take())
            enabled, cache = self.store_prev
            for f in cache:
                self.store.put(f)
            self.store.enabled = enabled
