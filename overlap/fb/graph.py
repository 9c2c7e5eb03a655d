"""Autograd plumbing: the forward cut at sub-stage boundaries and the node that ties it
back together.

When grad is enabled, the forward cuts the autograd graph at every sub-stage boundary
(each sub-stage sees detached inputs that require grad when the originals did) and ties
the pieces together with one autograd node (:class:`_Stitch`) on the module's outputs.  A
plain ``loss.backward()`` reaches that node, which runs the sub-stage backwards one after
another (so a :class:`~overlap.fb.SubStageModule` trains like any module, with the same
numbers), while :func:`~overlap.fb.overlapped_forward_backward` finds the node from
``loss1``/``outputs1`` and drives the same per-sub-stage steps itself, interleaved with the
forward.  Both execute the same kernels in the same order inside each sub-stage, so the
loss is bitwise equal to an uncut module's and the gradients are equal too (bitwise unless
a parameter is shared between sub-stages and already had a gradient, where the addition
order differs).

Limits: ``retain_graph``/double backward through a sub-stage module are not supported (a
second backward raises); sub-stages must not modify their inputs in place;
``torch.autograd.grad`` through the module computes input gradients correctly but also
accumulates parameter gradients into ``.grad`` (like reentrant checkpointing).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from ..timeline import Timeline
from .handles import Tensors
from .substages import SubStage

log = logging.getLogger(__name__)


try:  # torch >= 2.3 routes through this (keeps contextvars visible in device threads)
    from torch.autograd.graph import _engine_run_backward as _engine
except ImportError:  # pragma: no cover - older torch
    _engine = torch.autograd.Variable._execution_engine.run_backward  # type: ignore[attr-defined]


def _run_engine(roots: Sequence[Any], grads: Sequence[torch.Tensor]) -> None:
    """Backward from ``roots`` (tensors or gradient edges) with ``grads``, accumulating into
    leaves.  Calls the engine directly: no shape check against a root whose ``.data`` a
    pipeline runtime may have released (the engine checks against the graph instead)."""
    _engine(tuple(roots), tuple(grads), False, False, (),
            allow_unreachable=True, accumulate_grad=True)


_edge_roots: bool | None = None


def _edge_roots_ok() -> bool:
    """Whether the engine takes ``GradientEdge`` roots, so a sub-stage's outputs need not be
    kept alive (only their graph) until its backward.  Probed once, on first use."""
    global _edge_roots
    if _edge_roots is None:
        try:
            from torch.autograd.graph import get_gradient_edge
            with torch.enable_grad():
                x = torch.zeros(1, requires_grad=True)
                _run_engine([get_gradient_edge(x * 2)], [torch.ones(1)])
            _edge_roots = bool(x.grad is not None and float(x.grad[0]) == 2.0)
        except Exception as e:  # noqa: BLE001 - feature probe
            log.debug("GradientEdge roots unsupported (%s): keeping sub-stage outputs alive", e)
            _edge_roots = False
    return _edge_roots


def _root(t: torch.Tensor) -> Any:
    if _edge_roots_ok():
        from torch.autograd.graph import get_gradient_edge
        return get_gradient_edge(t)
    return t


def _cut(xs: Tensors, needs: Sequence[bool]) -> Tensors:
    """Detached copies (sharing storage) that require grad where ``needs`` says."""
    out = []
    for t, need in zip(xs, needs):
        leaf = t.detach()
        if need:
            leaf.requires_grad_(True)
        out.append(leaf)
    return tuple(out)


def _differentiable(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


class _Segment:
    """What one sub-stage's backward needs: for compute, its leaf inputs that require grad
    (``None`` elsewhere) and the graph roots of its outputs that require grad; for comm, which
    inputs need a gradient and the outputs' shapes (to send zeros where none flowed)."""

    __slots__ = ("index", "stage", "ins", "roots", "in_needs", "out_meta", "wgrads")

    def __init__(self, index: int, stage: SubStage) -> None:
        self.index = index
        self.stage = stage
        self.ins: tuple[torch.Tensor | None, ...] = ()
        self.roots: tuple[Any, ...] = ()
        self.in_needs: tuple[bool, ...] = ()
        self.out_meta: tuple[tuple[torch.Size, torch.dtype, torch.device], ...] = ()
        self.wgrads: list[Callable[[], None]] | None = None

    def release(self) -> None:
        self.ins = ()
        self.roots = ()


class _Graph:
    """The cut graph of one forward of a :class:`SubStageModule`.

    ``state``: ``live`` (backward not started), ``claimed`` (an overlapped pair waits for
    the output gradients from ``loss1.backward()``), ``stashed`` (they arrived), ``running``,
    ``done``."""

    __slots__ = ("owner", "stages", "segments", "inputs", "in_mask", "out_needs",
                 "state", "stash", "__weakref__")

    def __init__(self, owner: nn.Module, stages: Sequence[SubStage], segments: list[_Segment],
                 inputs: Tensors, out_needs: tuple[bool, ...]) -> None:
        self.owner = weakref.ref(owner)
        self.stages = tuple(stages)
        self.segments = segments
        self.in_mask = tuple(t.requires_grad for t in inputs)
        self.inputs = tuple(t for t in inputs if t.requires_grad)
        self.out_needs = out_needs
        self.state = "live"
        self.stash: tuple[torch.Tensor | None, ...] | None = None

    def inputs_are_leaves(self) -> bool:
        return all(t.grad_fn is None for t in self.inputs)


class _Stitch(torch.autograd.Function):
    """Ties a cut graph to the module's outputs: its backward runs the sub-stage backwards
    (plain use), or hands the output gradients to an overlapped pair that claimed it."""

    @staticmethod
    def forward(ctx: Any, graph: _Graph, finals: Tensors, *inputs: torch.Tensor) -> Tensors:
        ctx.graph = graph
        ctx.n_inputs = len(inputs)
        ctx.set_materialize_grads(False)
        outs = tuple(f.detach() for f in finals)
        fixed = [o for o, need in zip(outs, graph.out_needs) if not need]
        if fixed:
            ctx.mark_non_differentiable(*fixed)
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        g: _Graph = ctx.graph
        none = (None, None)
        if g.state == "claimed":
            g.stash = grads
            g.state = "stashed"
            return none + (None,) * ctx.n_inputs
        if g.state != "live":
            raise RuntimeError(
                "backward through a SubStageModule's forward a second time: its sub-stage "
                "graphs were freed by the first backward (retain_graph is not supported "
                "through SubStageModule; run the forward again)")
        g.state = "running"
        from .programs import _BackwardRun  # the programs build on this module
        run = _BackwardRun(g, grads, pair=None, tl=Timeline.current(), collect=False)
        for i in reversed(range(len(g.segments))):
            run.step_b(i)
        in_grads = run.input_grads()
        if g.inputs:
            return none + in_grads
        return none + (None,) * ctx.n_inputs  # only the dummy input: nothing upstream
