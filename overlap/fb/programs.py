"""The forward and backward programs of a sub-stage module, one step at a time (the same
code runs plain and interleaved): :class:`_ForwardRun`, :class:`_BackwardRun`.

Streams (CUDA): compute sub-stages run on ``StreamPair.compute``, communication is
launched on ``StreamPair.comm`` after it waits for the compute stream; inputs of a
communication are handed to the comm stream and its outputs to the compute stream
(``record_stream``).  On the CPU the same code runs with the no-op twin; a gloo
``async_op=True`` collective or :func:`~overlap.fb.run_async` runs the communication in
another thread, so it really overlaps the host's compute.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..streams import StreamEvent, StreamPair
from ..timeline import Timeline
from .graph import _cut, _differentiable, _Graph, _root, _run_engine, _Segment, _Stitch
from .handles import CommHandle, Tensors, _as_tensors
from .substages import COMPUTE, SubStage
from .weight_grads import _CollectWeightGrads

#: Timeline lanes the sub-stages are recorded on (separate from the runtime's
#: ``"compute"``/``"comm"`` action lanes, so a whole F&B action does not count as compute).
SUBSTAGE_COMPUTE_LANE = "sub.compute"
SUBSTAGE_COMM_LANE = "sub.comm"
#: One span per overlapped pair (label ``"F&B"``): the windows for per-pair metrics.
FB_WINDOW_LANE = "sub.fb"


class _Pending:
    """A launched communication and how to collect its result."""

    __slots__ = ("handle", "done", "rec", "tl", "outs")

    def __init__(self, handle: CommHandle, done: StreamEvent | None, rec: Any,
                 tl: Timeline | None, outs: Tensors | None) -> None:
        self.handle = handle
        self.done = done
        self.rec = rec
        self.tl = tl
        self.outs = outs

    def resolve(self, pair: StreamPair | None) -> Tensors:
        if self.outs is not None:  # stream-ordered: already waited on the comm stream
            if pair is not None:
                pair.wait(self.done, "compute")
                pair.handoff(self.outs, to="compute")
            return self.outs
        outs = self.handle.wait()
        if self.tl is not None:
            self.tl.end(self.rec)
        if pair is not None and pair.is_cuda:
            pair.handoff(outs, to="compute")
        return outs


def _launch(start: Callable[..., Any], args: Tensors, label: str, pair: StreamPair | None,
            tl: Timeline | None, after: StreamEvent | None) -> _Pending:
    """Start a communication: on the comm stream when ``pair`` is given, after ``after``
    (the event recorded when its inputs were produced; ``None``: after all work issued
    so far on the current stream)."""
    if pair is None:
        rec = tl.begin(SUBSTAGE_COMM_LANE, label) if tl is not None else None
        handle = _check_handle(start(*args), label)
        if rec is not None and tl.clock == "host":
            handle.add_done_callback(lambda: tl.end_at(rec, time.perf_counter()))
        return _Pending(handle, None, rec, tl, None)
    # waiting for the producer's event only (not the whole compute stream) lets e.g.
    # dispatch(F) start while mlp(B), issued after attn(F), still runs
    with pair.on("comm", wait_for="current" if after is None else after):
        pair.handoff(args, to="comm")
        stream = pair.comm if pair.is_cuda else None
        rec = tl.begin(SUBSTAGE_COMM_LANE, label, stream) if tl is not None else None
        handle = _check_handle(start(*args), label)
        if pair.is_cuda and handle.stream_ordered:
            outs = handle.wait()  # the comm stream waits; the host does not
            done = pair.record("comm")
            if tl is not None:
                tl.end(rec, pair.comm)
            return _Pending(handle, done, None, None, outs)
    if tl is not None and rec is not None and tl.clock == "host":
        handle.add_done_callback(lambda: tl.end_at(rec, time.perf_counter()))
    return _Pending(handle, None, rec, tl, None)


def _mark(pair: StreamPair | None) -> StreamEvent | None:
    """An event after the work issued so far on the compute stream (CUDA pairs only)."""
    return pair.record("compute") if pair is not None and pair.is_cuda else None


def _check_handle(h: Any, label: str) -> CommHandle:
    if not isinstance(h, CommHandle):
        raise TypeError(f"communication sub-stage step {label!r} must return a CommHandle "
                        f"(CommHandle.from_work(work, out), run_async(fn, ...), "
                        f"CommHandle.ready(out)), got {type(h).__name__}")
    return h


def _span(tl: Timeline | None, label: str):
    return tl.span(SUBSTAGE_COMPUTE_LANE, label) if tl is not None else _NO_CM


_NO_CM = contextlib.nullcontext()  # reusable: it keeps no state between uses


class _ForwardRun:
    """Runs a module's sub-stages one step at a time; with grad enabled, cuts the graph at
    each boundary and records what the per-sub-stage backward needs."""

    def __init__(self, module: nn.Module, stages: Sequence[SubStage], inputs: Tensors,
                 pair: StreamPair | None, tl: Timeline | None) -> None:
        self.module = module
        self.stages = stages
        self.inputs = inputs
        self.pair = pair
        self.tl = tl
        self.grad = torch.is_grad_enabled()
        self.xs: Tensors = inputs
        self.needs = tuple(self.grad and t.requires_grad for t in inputs)
        self.segments: list[_Segment] = []
        self.pending: _Pending | None = None
        self.ready: StreamEvent | None = None  # when the current xs were produced (CUDA)
        self.next = 0

    def _resolve(self) -> None:
        p = self.pending
        if p is None:
            return
        self.pending = None
        self.ready = None
        outs = p.resolve(self.pair)
        if any(t is None for t in outs):
            raise TypeError(f"the forward of comm sub-stage {self.segments[-1].stage.name!r} "
                            "returned None in its result: a forward communication must return "
                            "tensors only (None is allowed in a backward's gradients)")
        if self.grad:  # a communication's result starts a new graph piece
            outs = tuple(t.detach() for t in outs)
        seg = self.segments[-1]
        seg.out_meta = tuple((t.shape, t.dtype, t.device) for t in outs)
        flows = self.grad and any(seg.in_needs) and seg.stage.backward is not None
        self.xs = outs
        self.needs = tuple(flows and _differentiable(t) for t in outs)

    def step(self, i: int) -> None:
        if i != self.next:
            raise RuntimeError(f"internal: forward step {i} out of order (expected {self.next})")
        self.next += 1
        self._resolve()
        st = self.stages[i]
        label = f"F:{st.name}"
        seg = _Segment(i, st)
        if st.kind == COMPUTE:
            ins = _cut(self.xs, self.needs) if self.grad else self.xs
            with _span(self.tl, label):
                if self.grad and st.recompute:
                    from torch.utils.checkpoint import checkpoint
                    out = checkpoint(st.fn, *ins, use_reentrant=False)
                else:
                    out = st.fn(*ins)
                outs = _as_tensors(out, f"the output of compute sub-stage {st.name!r}")
            if self.grad:
                seg.ins = tuple(t if t.requires_grad else None for t in ins)
                seg.roots = tuple(_root(o) if o.requires_grad else None for o in outs)
                self.segments.append(seg)
            self.xs = outs
            self.needs = tuple(self.grad and o.requires_grad for o in outs)
            self.ready = _mark(self.pair)
        else:
            seg.in_needs = self.needs
            self.segments.append(seg)
            self.pending = _launch(st.fn, self.xs, label, self.pair, self.tl, self.ready)

    def finish(self) -> Tensors:
        """Collect the last communication and return the module's outputs (tied to the
        cut graph when anything needs a gradient)."""
        if self.next != len(self.stages):
            raise RuntimeError(f"internal: forward finished after {self.next} of "
                               f"{len(self.stages)} sub-stages")
        self._resolve()
        finals = self.xs
        if not (self.grad and any(self.needs)):
            return finals
        graph = _Graph(self.module, self.stages, self.segments, self.inputs, self.needs)
        self.segments = []
        ins = graph.inputs
        if not ins:  # no input requires grad: a dummy so the stitch node exists
            ins = (torch.empty(0, requires_grad=True),)
        return _Stitch.apply(graph, finals, *ins)


class _BackwardRun:
    """Runs the per-sub-stage backward of a cut graph, one step at a time (last sub-stage
    first); ``collect=True`` defers the weight gradients of ``split_weight_grad``
    sub-stages to their ``W`` step."""

    def __init__(self, graph: _Graph, grads: Sequence[torch.Tensor | None],
                 pair: StreamPair | None, tl: Timeline | None, collect: bool) -> None:
        if len(grads) != len(graph.out_needs):
            raise RuntimeError(f"internal: {len(grads)} output gradients for "
                               f"{len(graph.out_needs)} outputs")
        self.g = graph
        self.stages = graph.stages
        self.pair = pair
        self.tl = tl
        self.collect = collect
        self.grads: tuple[torch.Tensor | None, ...] = tuple(grads)
        self.pending: _Pending | None = None
        self.pending_seg: _Segment | None = None
        self.ready: StreamEvent | None = None
        self.next = len(graph.segments) - 1

    def _resolve(self) -> None:
        p = self.pending
        if p is None:
            return
        self.pending = None
        self.ready = None
        seg = self.pending_seg
        got = p.resolve(self.pair)
        if len(got) != len(seg.in_needs):
            raise ValueError(f"the backward of comm sub-stage {seg.stage.name!r} returned "
                             f"{len(got)} gradient(s) but the sub-stage has {len(seg.in_needs)} "
                             "input(s): return one per input, in order")
        self.grads = tuple(g if need else None for g, need in zip(got, seg.in_needs))

    def step_b(self, index: int) -> None:
        if index != self.next:
            raise RuntimeError(f"internal: backward step {index} out of order "
                               f"(expected {self.next})")
        self.next -= 1
        self._resolve()
        seg = self.g.segments[index]
        st = seg.stage
        label = f"B:{st.name}"
        if st.kind == COMPUTE:
            pairs = [(r, g) for r, g in zip(seg.roots, self.grads)
                     if r is not None and g is not None]
            with _span(self.tl, label):
                if pairs and self.collect and st.split_weight_grad:
                    with _CollectWeightGrads() as bucket:
                        _run_engine([p[0] for p in pairs], [p[1] for p in pairs])
                    seg.wgrads = bucket
                elif pairs:
                    _run_engine([p[0] for p in pairs], [p[1] for p in pairs])
            self.grads = tuple(None if leaf is None else leaf.grad for leaf in seg.ins)
            seg.release()
            self.ready = _mark(self.pair)
            return
        if st.backward is None:
            if any(g is not None for g in self.grads):
                raise RuntimeError(f"comm sub-stage {st.name!r} was declared without a backward "
                                   "but its outputs received gradients: pass backward= to comm()")
            self.grads = (None,) * len(seg.in_needs)
            return
        if not any(seg.in_needs):
            self.grads = (None,) * len(seg.in_needs)
            return
        if len(self.grads) != len(seg.out_meta):
            raise RuntimeError(f"internal: {len(self.grads)} gradients for "
                               f"{len(seg.out_meta)} outputs of {st.name!r}")
        gs = tuple(g if g is not None else torch.zeros(shape, dtype=dt, device=dev)
                   for g, (shape, dt, dev) in zip(self.grads, seg.out_meta))
        self.grads = ()
        self.pending_seg = seg
        self.pending = _launch(st.backward, gs, label, self.pair, self.tl, self.ready)

    def step_w(self, index: int) -> None:
        seg = self.g.segments[index]
        fns = seg.wgrads
        if not fns:
            return
        seg.wgrads = None
        with _span(self.tl, f"W:{seg.stage.name}"):
            for fn in fns:
                fn()

    def input_grads(self) -> tuple[torch.Tensor | None, ...]:
        """Finish: collect the last communication, run weight gradients no ``W`` step ran,
        and return the gradients of the graph's inputs that require grad (in order)."""
        if self.next != -1:
            raise RuntimeError(f"internal: backward finished with {self.next + 1} "
                               "sub-stage(s) left")
        self._resolve()
        for seg in self.g.segments:
            if seg.wgrads:
                self.step_w(seg.index)
        g = self.g
        g.state = "done"
        g.segments = []
        if len(self.grads) != len(g.in_mask):
            raise RuntimeError(f"internal: {len(self.grads)} input gradients for "
                               f"{len(g.in_mask)} inputs")
        return tuple(x for x, keep in zip(self.grads, g.in_mask) if keep)

    def deliver(self) -> None:
        """Finish and accumulate the input gradients into the inputs' ``.grad`` (what the
        pipeline runtime reads), continuing upstream when an input is not a leaf."""
        grads = self.input_grads()
        pairs = [(t, x) for t, x in zip(self.g.inputs, grads) if x is not None]
        if pairs:
            _run_engine([p[0] for p in pairs], [p[1] for p in pairs])
