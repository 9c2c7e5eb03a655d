"""Probes that patch the transports and ``torch.distributed.pipelining`` to account time.

Each probe wraps a method or function once per process (calling it again returns the
same accumulator) and adds the seconds spent inside it to an accumulator the caller reads
deltas of: waits on transfers (ours: :meth:`overlap.transport.TransferHandle.wait` of
either transport; torch's ``_wait_batch_p2p``), time spent posting transfers, and the
time torch spends in its compute actions.
"""
from __future__ import annotations

import time


def ours_wait_probe() -> list[float]:
    """Accumulate the time this process spends in ``overlap.p2p.Handle.wait`` and
    ``overlap.shm.ShmHandle.wait`` -- every wait our runtime does on a transfer
    (receives, the step handshake, the send drain at the end of a step), whichever
    transport carries it.  Returns a one-element list holding seconds (read deltas)."""
    from overlap import p2p, shm
    if getattr(p2p.Handle.wait, "_bench_wrapped", False):
        return p2p.Handle.wait._bench_acc
    acc = [0.0]
    for cls in (p2p.Handle, shm.ShmHandle):
        orig = cls.wait

        def wait(self, *args, _orig=orig, **kwargs):
            if self.done:
                return self.tensors
            t0 = time.perf_counter()
            try:
                return _orig(self, *args, **kwargs)
            finally:
                acc[0] += time.perf_counter() - t0
        wait._bench_wrapped = True
        wait._bench_acc = acc
        cls.wait = wait
    return acc


def _time_function(owner, name: str) -> list[float]:
    """Wrap ``owner.<name>`` (once per process) so the seconds spent in it add up in a
    one-element list, which is returned (the same one on every later call); ``[0.0]``,
    not wrapped, when ``owner`` has no such function (another torch layout)."""
    orig = getattr(owner, name, None)
    if orig is None:
        return [0.0]
    if getattr(orig, "_bench_wrapped", False):
        return orig._bench_acc
    acc = [0.0]

    def wrapped(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return orig(*args, **kwargs)
        finally:
            acc[0] += time.perf_counter() - t0
    wrapped._bench_wrapped = True
    wrapped._bench_acc = acc
    setattr(owner, name, wrapped)
    return acc


def torch_wait_probe() -> list[float]:
    """Accumulate the time torch.distributed.pipelining's schedules spend in
    ``schedules._wait_batch_p2p`` (where they wait on every p2p work).  Returns a
    one-element list holding seconds."""
    from torch.distributed.pipelining import schedules as sch
    return _time_function(sch, "_wait_batch_p2p")


def torch_busy_probe() -> list[float]:
    """Accumulate the time torch.distributed.pipelining spends inside its compute
    actions (``forward_one_chunk``, ``backward_one_chunk``, ``backward_weight_one_chunk``
    of every stage, and the loss), the counterpart of our ``last_stats.busy``.  Returns a
    one-element list holding seconds."""
    try:
        from torch.distributed.pipelining import schedules as sch
        from torch.distributed.pipelining import stage as stg
        base = stg._PipelineStageBase
    except (ImportError, AttributeError):  # another torch layout: report no split
        return [0.0]
    if getattr(base, "_bench_busy", None) is not None:
        return base._bench_busy
    acc = [0.0]
    depth = [0]

    def wrap(owner, name):
        orig = getattr(owner, name, None)
        if orig is None:
            return

        def timed_call(*args, **kwargs):
            if depth[0]:
                return orig(*args, **kwargs)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return orig(*args, **kwargs)
            finally:
                acc[0] += time.perf_counter() - t0
                depth[0] -= 1
        setattr(owner, name, timed_call)

    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        wrap(base, name)
    wrap(sch._PipelineSchedule, "_maybe_compute_loss")
    base._bench_busy = acc
    return acc


def ours_post_probe() -> dict:
    """Accumulate the time spent *posting* transfers (``isend`` / ``irecv`` of
    ``overlap.p2p.P2P`` and ``overlap.shm.ShmP2P``: the call that enqueues them; on
    shared memory a send usually completes inside it).  Our runtime posts sends inside
    compute actions (right after the producing compute) and receives outside them.
    Returns ``{"send": s, "recv": s}`` (read deltas)."""
    from overlap import p2p, shm
    if getattr(p2p.P2P, "_bench_post", None) is not None:
        return p2p.P2P._bench_post
    acc = {"send": 0.0, "recv": 0.0}

    def wrap(cls, name, key):
        orig = getattr(cls, name)

        def posted(self, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(self, *args, **kwargs)
            finally:
                acc[key] += time.perf_counter() - t0
        setattr(cls, name, posted)
    for cls in (p2p.P2P, shm.ShmP2P):
        wrap(cls, "isend", "send")
        wrap(cls, "irecv", "recv")
    p2p.P2P._bench_post = acc
    return acc


def torch_post_probe() -> list[float]:
    """Accumulate the time torch.distributed.pipelining spends posting p2p operations
    (``schedules._batch_p2p``).  Returns a one-element list holding seconds."""
    from torch.distributed.pipelining import schedules as sch
    return _time_function(sch, "_batch_p2p")
