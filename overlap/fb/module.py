"""Sub-stage modules and the overlapped pair: :class:`SubStageModule`,
:func:`run_substages`, :func:`overlapped_forward_backward` (the DualPipe F&B contract)
and :func:`plain_forward_backward`.

Subclass :class:`SubStageModule`, implement :meth:`SubStageModule.substages`, and the class
gets a ``forward`` (the sub-stages in order) and a classmethod
``overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1,
outputs1, output_grads1) -> (outputs0, loss0)`` with the published DualPipe contract:
``module0`` runs a forward on ``inputs0`` (plus ``criterion0(*outputs0, *labels0)`` on the
last stage), ``module1`` runs the full backward of an earlier forward (from ``loss1``, or
from ``outputs1`` with ``output_grads1``), leaving the input gradients in ``.grad`` of
``module1``'s inputs.  The two are interleaved so that while one side's communication
is in flight the other side computes, in DeepSeek's order (for the MoE layer)::

    B:combine  F:attn  B:mlp  F:dispatch  B:dispatch  W:mlp  F:mlp  B:attn  W:attn  F:combine

(:func:`~overlap.fb.build_order` derives this order for any sub-stage lists, or takes an
explicit one).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, ClassVar, Sequence

import torch
import torch.nn as nn

from ..streams import StreamPair
from ..timeline import Timeline
from .graph import _Graph, _run_engine, _Stitch
from .handles import Tensors
from .programs import FB_WINDOW_LANE, _BackwardRun, _ForwardRun
from .substages import OrderSpec, SubStage, build_order

log = logging.getLogger(__name__)


def _stages_of(module: nn.Module) -> tuple[SubStage, ...]:
    stages = module.substages()
    if isinstance(stages, SubStage) or not isinstance(stages, (list, tuple)):
        raise TypeError(f"{type(module).__name__}.substages() must return a list of SubStage "
                        f"(built with overlap.fb.compute/comm), got {type(stages).__name__}")
    if not stages:
        raise ValueError(f"{type(module).__name__}.substages() returned no sub-stage")
    names = set()
    for s in stages:
        if not isinstance(s, SubStage):
            raise TypeError(f"{type(module).__name__}.substages() must contain only SubStage "
                            f"objects, got {type(s).__name__}")
        if s.name in names:
            raise ValueError(f"{type(module).__name__}.substages(): the name {s.name!r} is used "
                             "twice; sub-stage names must be unique within a module")
        names.add(s.name)
    return tuple(stages)


def _tensors_in(inputs: Any, what: str) -> Tensors:
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{what} must be a tuple or list of tensors, got {type(inputs).__name__}")
    for i, t in enumerate(inputs):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(t).__name__}; sub-stages pass tensors only")
    return tuple(inputs)


def _config(module: nn.Module) -> dict:
    return getattr(module, "_overlap_config", None) or {}


def _pick_timeline(timeline: Timeline | None, module: nn.Module) -> Timeline | None:
    if timeline is not None:
        return timeline
    tl = _config(module).get("timeline")
    return tl if tl is not None else Timeline.current()


def run_substages(module: nn.Module, inputs: Sequence[torch.Tensor], *,
                  timeline: Timeline | None = None) -> Tensors:
    """Run ``module.substages()`` in order on ``inputs`` (what
    :meth:`SubStageModule.forward` does): on the current stream, each communication
    waited for before the next sub-stage.  Returns the outputs as a tuple, tied to the
    per-sub-stage graph when grad is enabled and anything requires grad."""
    stages = _stages_of(module)
    tl = _pick_timeline(timeline, module)
    run = _ForwardRun(module, stages, _tensors_in(inputs, "inputs"), None, tl)
    for i in range(len(stages)):
        run.step(i)
    return run.finish()


class SubStageModule(nn.Module):
    """Base class of a stage made of sub-stages.

    Implement :meth:`substages`; the class then has a ``forward`` and an
    ``overlapped_forward_backward`` classmethod (the DualPipe contract) that interleaves
    the forward of one module with the backward of another.  ``overlap_order`` (class
    attribute) or :meth:`configure_overlap` choose the order (see :func:`build_order`).

    Example (a toy MoE layer; ``a2a`` starts an all-to-all and returns a CommHandle)::

        class Layer(SubStageModule):
            def substages(self):
                return [compute("attn", self.attn),
                        comm("dispatch", a2a, a2a),
                        compute("mlp", self.mlp),
                        comm("combine", a2a, a2a)]
    """

    overlap_order: ClassVar[OrderSpec] = "alternate"

    def substages(self) -> Sequence[SubStage]:
        """The sub-stages of this module's forward, in order."""
        raise NotImplementedError(f"{type(self).__name__} must implement substages() returning "
                                  "a list of overlap.fb.compute(...)/comm(...) sub-stages")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | Tensors:
        """The sub-stages in order; one output tensor is returned as is, several as a tuple."""
        outs = run_substages(self, inputs)
        return outs[0] if len(outs) == 1 else outs

    def configure_overlap(self, *, streams: StreamPair | None = None,
                          timeline: Timeline | None = None,
                          order: OrderSpec | None = None) -> "SubStageModule":
        """Per-module settings for overlapped pairs where this is ``module0``: the
        :class:`StreamPair` (default: the device's shared pair), a :class:`Timeline` to
        record sub-stage spans into (default: :meth:`Timeline.current`), and the order
        (default: ``overlap_order``).  Returns ``self``."""
        if streams is not None and not isinstance(streams, StreamPair):
            raise TypeError(f"streams must be a StreamPair, got {type(streams).__name__}")
        if timeline is not None and not isinstance(timeline, Timeline):
            raise TypeError(f"timeline must be a Timeline, got {type(timeline).__name__}")
        self._overlap_config = {"streams": streams, "timeline": timeline, "order": order}
        return self

    @classmethod
    def overlapped_forward_backward(
        cls,
        module0: nn.Module,
        inputs0: Sequence[torch.Tensor],
        criterion0: Callable[..., torch.Tensor] | None,
        labels0: Sequence[torch.Tensor] | None,
        module1: nn.Module,
        loss1: torch.Tensor | None,
        outputs1: Sequence[torch.Tensor] | None,
        output_grads1: Sequence[torch.Tensor | None] | None,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The DualPipe F&B contract (see :func:`overlapped_forward_backward`)."""
        return overlapped_forward_backward(module0, inputs0, criterion0, labels0,
                                           module1, loss1, outputs1, output_grads1)


def _plain_backward(loss1: torch.Tensor | None, outputs1: Sequence[torch.Tensor] | None,
                    output_grads1: Sequence[torch.Tensor | None] | None) -> None:
    if loss1 is not None:
        loss1.backward()
        return
    if not outputs1:
        return
    pairs = [(o, g) for o, g in zip(outputs1, output_grads1 or ())
             if o.requires_grad and g is not None]
    if pairs:
        _run_engine([p[0] for p in pairs], [p[1] for p in pairs])


def _graph_of_outputs(module1: nn.Module, outputs1: Sequence[torch.Tensor],
                      output_grads1: Sequence[torch.Tensor | None]) -> tuple[_Graph, list] | None:
    graph = None
    grads: list[torch.Tensor | None] = []
    for o, gr in zip(outputs1, output_grads1):
        if not o.requires_grad or gr is None:
            continue
        node = o.grad_fn
        if not isinstance(node, _Stitch._backward_cls):
            return None
        g = node.graph
        if graph is None:
            graph = g
            grads = [None] * len(g.out_needs)
        elif g is not graph:
            return None
        i = o.output_nr
        grads[i] = gr if grads[i] is None else grads[i] + gr
    if graph is None or graph.owner() is not module1 or graph.state != "live":
        return None
    return graph, grads


def _graph_of_loss(module1: nn.Module, loss1: torch.Tensor, limit: int = 10_000) -> _Graph | None:
    """Find the cut graph of ``module1`` under ``loss1`` (the criterion's graph is small)."""
    root = loss1.grad_fn
    if root is None:
        return None
    found: list[_Graph] = []
    seen = {id(root)}
    todo = [root]
    while todo:
        node = todo.pop()
        if isinstance(node, _Stitch._backward_cls):
            g = node.graph
            if g.owner() is module1 and g.state == "live" and g not in found:
                found.append(g)
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                if len(seen) >= limit:
                    log.debug("loss graph larger than %d nodes: not overlapping this "
                              "backward", limit)
                    return None
                seen.add(id(nxt))
                todo.append(nxt)
    return found[0] if len(found) == 1 else None


def _claim_backward(module1: nn.Module, loss1: torch.Tensor | None,
                    outputs1: Sequence[torch.Tensor] | None,
                    output_grads1: Sequence[torch.Tensor | None] | None,
                    pair: StreamPair | None, tl: Timeline | None) -> _BackwardRun | None:
    """Take over module1's backward when it ran through sub-stages; ``None``: do it plainly."""
    if loss1 is not None:
        if not isinstance(loss1, torch.Tensor):
            raise TypeError(f"loss1 must be a tensor or None, got {type(loss1).__name__}")
        graph = _graph_of_loss(module1, loss1)
        if graph is None or not graph.inputs_are_leaves():
            return None
        graph.state = "claimed"
        try:
            loss1.backward()  # the criterion's backward; the stitch node stashes its grads
        except BaseException:
            graph.state = "live"
            raise
        if graph.state != "stashed":  # loss did not reach the module's outputs
            graph.state = "live"
            return _EMPTY
        graph.state = "running"
        grads = graph.stash
        graph.stash = None
        return _BackwardRun(graph, grads, pair, tl, collect=True)
    if not outputs1:
        return _EMPTY
    if output_grads1 is None or len(output_grads1) != len(outputs1):
        raise ValueError(f"output_grads1 must give one gradient (or None) per tensor of "
                         f"outputs1: got {0 if output_grads1 is None else len(output_grads1)} "
                         f"for {len(outputs1)}")
    found = _graph_of_outputs(module1, outputs1, output_grads1)
    if found is None:
        return None
    graph, grads = found
    graph.state = "running"
    return _BackwardRun(graph, grads, pair, tl, collect=True)


_EMPTY: Any = object()  # sentinel: nothing to backpropagate


def _device_of(inputs: Tensors, module: nn.Module) -> torch.device:
    for t in inputs:
        return t.device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def plain_forward_backward(
    module0: nn.Module, inputs0: Sequence[torch.Tensor],
    criterion0: Callable[..., torch.Tensor] | None, labels0: Sequence[torch.Tensor] | None,
    module1: nn.Module, loss1: torch.Tensor | None,
    outputs1: Sequence[torch.Tensor] | None,
    output_grads1: Sequence[torch.Tensor | None] | None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The F&B contract without overlap: ``module0``'s forward, then ``module1``'s backward
    (what the published example does).  The default for modules without sub-stages."""
    ins = _tensors_in(inputs0, "inputs0")
    out = module0(*ins)
    outputs0 = [out] if isinstance(out, torch.Tensor) else list(out)
    loss0 = criterion0(*outputs0, *(labels0 or ())) if criterion0 is not None else None
    _plain_backward(loss1, outputs1, output_grads1)
    return outputs0, loss0


def overlapped_forward_backward(
    module0: nn.Module, inputs0: Sequence[torch.Tensor],
    criterion0: Callable[..., torch.Tensor] | None, labels0: Sequence[torch.Tensor] | None,
    module1: nn.Module, loss1: torch.Tensor | None,
    outputs1: Sequence[torch.Tensor] | None,
    output_grads1: Sequence[torch.Tensor | None] | None,
    *, order: OrderSpec | None = None, streams: StreamPair | None = None,
    timeline: Timeline | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Forward of ``module0`` interleaved with the backward of ``module1``.

    Arguments (DualPipe's contract; ``B`` = micro-batch size, shapes are the stage's):

    * ``inputs0``: tuple/list of tensors, ``module0``'s inputs for this micro-batch;
    * ``criterion0``, ``labels0``: on the last stage, ``loss0 = criterion0(*outputs0,
      *labels0)`` (a scalar tensor); ``None`` and ``[]`` elsewhere;
    * ``loss1``: on the last stage, the loss of ``module1``'s earlier forward, to
      backpropagate; else ``None`` and ``outputs1``/``output_grads1`` give ``module1``'s
      outputs and the gradients received for them (same shapes/dtypes; outputs that need
      no gradient may be left out).

    Returns ``(outputs0, loss0)``: ``outputs0`` a list of tensors, ``loss0`` ``None`` unless
    ``criterion0`` was given.  Afterwards the gradients of ``module1``'s inputs are in
    their ``.grad`` and its parameters' gradients are accumulated.

    When ``module0`` is a :class:`SubStageModule` and ``module1``'s forward ran through its
    sub-stages, the steps of :func:`build_order` (``order``, default the module's
    configured or class order) run on ``streams`` (default the device's shared
    :class:`StreamPair`), recording sub-stage spans into ``timeline`` (default the
    module's, else :meth:`Timeline.current`).  Otherwise it falls back to
    :func:`plain_forward_backward` semantics (logged at debug level).
    """
    if not isinstance(module0, SubStageModule):
        return plain_forward_backward(module0, inputs0, criterion0, labels0,
                                      module1, loss1, outputs1, output_grads1)
    if criterion0 is not None and not callable(criterion0):
        raise TypeError(f"criterion0 must be callable or None, got {type(criterion0).__name__}")
    cfg = _config(module0)
    ins = _tensors_in(inputs0, "inputs0")
    tl = _pick_timeline(timeline, module0)
    pair = streams if streams is not None else cfg.get("streams")
    if pair is None:
        pair = StreamPair.for_device(_device_of(ins, module0))
    if order is None:
        order = cfg.get("order")
    if order is None:
        order = type(module0).overlap_order
    f_stages = _stages_of(module0)
    window = tl.begin(FB_WINDOW_LANE, "F&B") if tl is not None else None
    with pair.on("compute", join=True):
        bwd = _claim_backward(module1, loss1, outputs1, output_grads1, pair, tl)
        fwd = _ForwardRun(module0, f_stages, ins, pair, tl)
        if bwd is None:
            log.debug("%s: module1's backward did not run through sub-stages; running it "
                      "after the forward, without overlap", type(module0).__name__)
        if bwd is None or bwd is _EMPTY:  # nothing to interleave with: forward steps only
            steps = build_order(f_stages, (), "sequential")
        else:
            steps = build_order(f_stages, bwd.stages, order)
        for st in steps:
            if st.side == "F":
                fwd.step(st.index)
            elif st.side == "B":
                bwd.step_b(st.index)
            else:
                bwd.step_w(st.index)
        outputs0 = list(fwd.finish())
        loss0 = criterion0(*outputs0, *(labels0 or ())) if criterion0 is not None else None
        if bwd is None:
            _plain_backward(loss1, outputs1, output_grads1)
        elif bwd is not _EMPTY:
            bwd.deliver()
    if tl is not None:
        tl.end(window)
    return outputs0, loss0
