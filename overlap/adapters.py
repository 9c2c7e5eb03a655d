"""Plug the overlapped forward-backward into other pipeline runtimes.

``torch.distributed.pipelining``
--------------------------------
Newer torch releases ship ``ScheduleDualPipeV``, whose steady state is made of
``OVERLAP_F_B`` actions: an action with two sub-actions, ``FORWARD`` of one stage's
micro-batch and ``FULL_BACKWARD`` of another's.  By default torch runs them one after
the other; ``schedule.register_custom_function(OVERLAP_F_B, fn)`` replaces that with
``fn(action, ctx)``, where ``ctx.schedule_ref`` is the schedule and
``ctx.arg_mbs/kwarg_mbs/target_mbs`` the split step arguments.  The function must do
everything the default path does for both sub-actions: wait for the receives posted
for them, run the forward (``stage.forward_one_chunk``, which fills the stage's
forward cache), compute the loss on a last stage, hand the output to a same-rank next
stage (the V schedule's local hand-off), then the backward of the other stage (pop its
forward cache, take the loss or the received output gradients, accumulate parameter
gradients, store the input gradients in the stage's backward cache for the send
that follows, hand them to a same-rank previous stage, count the backward).

:func:`register_overlapped_forward_backward` registers such a function,
:class:`TorchOverlapFB`.  For a pair whose two stage modules are of one class that
defines the DualPipe classmethod ``overlapped_forward_backward`` (every
:class:`overlap.fb.SubStageModule`), it runs that classmethod, so the forward's
sub-stages interleave with the backward's exactly as under our DualPipe runtime, while
torch's own ``forward_one_chunk`` keeps the stage's caches and validation.  Any other
pair (other module classes, keyword arguments, DDP/FSDP-wrapped modules, a
``BACKWARD_INPUT`` sub-action, grad disabled) runs as torch's default path would, and
is counted in :attr:`TorchOverlapFB.plain`.

Availability: ``ScheduleDualPipeV`` and ``register_custom_function`` exist only in
newer torch; :func:`torch_overlap_support` says whether the installed one has them
(and why not).  The adapter reads a few of the schedule's and stage's internal
attributes (``fwd_cache``, ``bwd_cache``, ``fwd_recv_ops``, ``bwd_recv_ops``,
``backward_counter``, ``_maybe_compute_loss``, ``_maybe_get_loss``,
``_retrieve_recv_grads``), as torch's own default path and torchtitan's DualPipeV
callback do; :func:`torch_overlap_support` checks them too.

Limits: ``loss_kwargs`` given to ``schedule.step`` are not visible to custom functions
(torch does not put them into the context), so the loss of a forward run by this
adapter is computed without them; the forward saves its output for the merge of the
last stage's outputs whatever ``return_outputs`` was (as torchtitan's callback does).
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.nn as nn

from .fb import OrderSpec, overlapped_forward_backward
from .timeline import Timeline

__all__ = ["torch_overlap_support", "TorchOverlapFB", "register_overlapped_forward_backward"]

log = logging.getLogger(__name__)

_STAGE_ATTRS = ("fwd_cache", "bwd_cache", "forward_one_chunk", "backward_one_chunk",
                "_retrieve_recv_grads", "set_local_fwd_input", "set_local_bwd_input",
                "get_local_bwd_output")
_SCHEDULE_ATTRS = ("register_custom_function", "_maybe_compute_loss", "_maybe_get_loss",
                   "_step_microbatches")


def torch_overlap_support() -> tuple[bool, str]:
    """``(True, "")`` when the installed torch has ``ScheduleDualPipeV``, the
    ``OVERLAP_F_B`` computation type and ``register_custom_function`` (with the
    internals the adapter uses); otherwise ``(False, reason)``."""
    try:
        from torch.distributed.pipelining import schedules as S
        from torch.distributed.pipelining import stage as St
    except Exception as e:  # noqa: BLE001 - any import problem means "not supported"
        return False, f"torch {torch.__version__}: torch.distributed.pipelining unavailable ({e})"
    missing = [n for n in ("ScheduleDualPipeV", "_PipelineScheduleRuntime", "_ComputationType",
                           "_PipelineContext") if not hasattr(S, n)]
    if not missing and not hasattr(S._ComputationType, "OVERLAP_F_B"):
        missing.append("_ComputationType.OVERLAP_F_B")
    if not missing:
        missing += [f"_PipelineScheduleRuntime.{a}" for a in _SCHEDULE_ATTRS
                    if not hasattr(S._PipelineScheduleRuntime, a)]
        base = getattr(St, "_PipelineStageBase", None)
        if base is None:
            missing.append("stage._PipelineStageBase")
        else:
            # fwd_cache/bwd_cache are instance attributes: check the methods only here
            missing += [f"_PipelineStageBase.{a}" for a in _STAGE_ATTRS
                        if not a.endswith("_cache") and not hasattr(base, a)]
    if missing:
        return False, (f"torch {torch.__version__} lacks {', '.join(missing)} in "
                       "torch.distributed.pipelining (ScheduleDualPipeV with OVERLAP_F_B "
                       "custom functions needs a newer torch)")
    return True, ""


def _types() -> Any:
    ok, why = torch_overlap_support()
    if not ok:
        raise RuntimeError(why)
    from torch.distributed.pipelining import schedules as S
    return S


def _wait_all(works: Any) -> None:
    if works is None:
        return
    if not isinstance(works, (list, tuple)):
        works = [works]
    for w in works:
        w.wait()


def _is_wrapped(module: nn.Module) -> bool:
    """DDP / FSDP modules need torch's no_sync / reshard handling around backward."""
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(module, DistributedDataParallel):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # noqa: BLE001 - older torch: no FSDP2
        return False
    return isinstance(module, FSDPModule)


class TorchOverlapFB:
    """The ``OVERLAP_F_B`` custom function for ``torch.distributed.pipelining``
    schedules (call it as ``fn(action, ctx)``; register it with
    :func:`register_overlapped_forward_backward`).

    Args:
        order: the interleaving order for :class:`overlap.fb.SubStageModule` stages
            (``None``: each module's configured or class order); ignored for classes
            with their own ``overlapped_forward_backward``.
        timeline: a :class:`overlap.timeline.Timeline` the sub-stage spans are recorded
            into (default: :meth:`Timeline.current`, e.g. ``with tl.activate():``
            around ``schedule.step``).

    Attributes (counters, per process, never reset by the adapter):
        calls: pairs run through an ``overlapped_forward_backward``.
        plain: pairs run as torch's default path (forward, then backward).
        last_reason: why the last plain pair was not overlapped (``""`` if none was).
    """

    def __init__(self, *, order: OrderSpec | None = None,
                 timeline: Timeline | None = None) -> None:
        if timeline is not None and not isinstance(timeline, Timeline):
            raise TypeError(f"timeline must be an overlap.timeline.Timeline, got "
                            f"{type(timeline).__name__}")
        self.order = order
        self.timeline = timeline
        self.calls = 0
        self.plain = 0
        self.last_reason = ""
        self._S = _types()

    # -- the custom function -------------------------------------------------------
    def __call__(self, action: Any, ctx: Any) -> None:
        S = self._S
        sched = ctx.schedule_ref
        subs = getattr(action, "sub_actions", None)
        if action.computation_type != S.OVERLAP_F_B or not subs or len(subs) != 2:
            raise ValueError(f"the overlapped forward-backward handles OVERLAP_F_B actions "
                             f"with two sub-actions (FORWARD, backward); got {action!r}: "
                             "register it only for _ComputationType.OVERLAP_F_B")
        stages = {st.stage_index: st for st in sched._stages}
        fwd, bwd = subs
        reason = self._why_plain(fwd, bwd, stages, ctx)
        if reason:
            self.plain += 1
            self.last_reason = reason
            log.debug("OVERLAP_F_B %r runs forward then backward: %s", action, reason)
            for sub in subs:
                self._plain_action(sub, sched, stages, ctx)
            return
        self._overlapped(fwd, bwd, sched, stages, ctx)
        self.calls += 1

    def _why_plain(self, fwd: Any, bwd: Any, stages: dict, ctx: Any) -> str:
        S = self._S
        if fwd.computation_type != S.FORWARD:
            return f"first sub-action {fwd!r} is not a FORWARD"
        if bwd.computation_type != S.FULL_BACKWARD:
            return f"second sub-action {bwd!r} is not a FULL_BACKWARD"
        if fwd.stage_index not in stages or bwd.stage_index not in stages:
            raise ValueError(f"OVERLAP_F_B sub-actions {fwd!r}, {bwd!r} name stages that are "
                             f"not on this rank (it holds {sorted(stages)})")
        f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
        m0, m1 = f_stage.submod, b_stage.submod
        if type(m0) is not type(m1):
            return (f"the stage modules are of different classes ({type(m0).__name__}, "
                    f"{type(m1).__name__})")
        if not hasattr(type(m0), "overlapped_forward_backward"):
            return f"{type(m0).__name__} defines no overlapped_forward_backward"
        if _is_wrapped(m0) or _is_wrapped(m1):
            return "DDP/FSDP-wrapped stage modules"
        if not torch.is_grad_enabled() or not b_stage.has_backward:
            return "no backward (grad disabled or the stage has no backward)"
        mb = fwd.microbatch_index
        if ctx.kwarg_mbs is not None and ctx.kwarg_mbs[mb]:
            return "the forward has keyword arguments (the F&B contract is positional)"
        if f_stage.is_first and not all(isinstance(a, torch.Tensor)
                                        for a in (ctx.arg_mbs[mb] or ())):
            return "the first stage's arguments are not all tensors"
        if b_stage.is_last and getattr(ctx.schedule_ref, "_loss_fn", True) is None:
            return "the last stage has no loss function (the schedule's loss_fn is None)"
        return ""

    # -- torch's default path, sub-action by sub-action -------------------------------
    def _plain_action(self, a: Any, sched: Any, stages: dict, ctx: Any) -> None:
        S = self._S
        stage = stages[a.stage_index]
        mb = a.microbatch_index
        if a.computation_type == S.FORWARD:
            self._recv_forward(sched, stages, stage, mb, a)
            self._forward(sched, stages, stage, mb, ctx)
        elif a.computation_type in (S.FULL_BACKWARD, S.BACKWARD_INPUT):
            self._recv_backward(sched, stages, stage, mb, a)
            full = a.computation_type == S.FULL_BACKWARD
            loss = sched._maybe_get_loss(stage, mb)
            last = False
            if full:
                sched.backward_counter[stage.stage_index] += 1
                last = sched.backward_counter[stage.stage_index] == sched._n_microbatches
            stage.backward_one_chunk(mb, loss=loss, full_backward=full, last_backward=last)
            prev = stages.get(stage.stage_index - 1)
            if prev is not None:
                prev.set_local_bwd_input(stage.get_local_bwd_output(mb), mb)
        else:
            raise ValueError(f"unsupported OVERLAP_F_B sub-action {a!r}: expected FORWARD, "
                             "FULL_BACKWARD or BACKWARD_INPUT")

    @staticmethod
    def _assert_unsharded(sched: Any, stage: Any) -> None:
        check = getattr(sched, "_assert_unsharded", None)
        if check is not None:
            check(stage)

    def _recv_forward(self, sched: Any, stages: dict, stage: Any, mb: int, a: Any) -> None:
        self._assert_unsharded(sched, stage)
        if stage.is_first or (stage.stage_index - 1) in stages:
            return  # no receive: inputs are the step's, or a same-rank stage's outputs
        ops = sched.fwd_recv_ops.pop((stage.stage_index, mb), None)
        if ops is None:
            raise RuntimeError(f"{a!r}: computing a forward before its input was received "
                               "(no RECV_F was posted for it)")
        _wait_all(ops)

    def _recv_backward(self, sched: Any, stages: dict, stage: Any, mb: int, a: Any) -> None:
        self._assert_unsharded(sched, stage)
        if stage.is_last or (stage.stage_index + 1) in stages:
            return
        ops = sched.bwd_recv_ops.pop((stage.stage_index, mb), None)
        if ops is None:
            raise RuntimeError(f"{a!r}: computing a backward before its output gradient was "
                               "received (no RECV_B was posted for it)")
        _wait_all(ops)

    @staticmethod
    def _forward(sched: Any, stages: dict, stage: Any, mb: int, ctx: Any) -> Any:
        out = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb])
        sched._maybe_compute_loss(stage, out, ctx.target_mbs, mb)
        nxt = stages.get(stage.stage_index + 1)
        if nxt is not None:  # the V schedule's same-rank hand-off
            nxt.set_local_fwd_input(out, mb)
        return out

    # -- the overlapped pair ----------------------------------------------------------------
    def _overlapped(self, fwd: Any, bwd: Any, sched: Any, stages: dict, ctx: Any) -> None:
        f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
        mb0, mb1 = fwd.microbatch_index, bwd.microbatch_index
        self._recv_forward(sched, stages, f_stage, mb0, fwd)
        self._recv_backward(sched, stages, b_stage, mb1, bwd)
        # what backward_one_chunk would take: the stage's forward cache, the loss or the
        # received output gradients
        if hasattr(b_stage, "_check_chunk_id"):
            b_stage._check_chunk_id(mb1)
        stage_output, input_values = b_stage.fwd_cache.pop(mb1)
        loss1, outs1, grads1 = None, None, None
        if b_stage.is_last:
            loss1 = sched._maybe_get_loss(b_stage, mb1)
            if loss1 is None:
                b_stage.fwd_cache[mb1] = (stage_output, input_values)
                raise RuntimeError(f"{bwd!r}: no loss for micro-batch {mb1} of the last stage "
                                   "(did step() get target= and the schedule a loss_fn?)")
        else:
            received = b_stage._retrieve_recv_grads(mb1)
            pairs = [(o, g) for o, g in zip(stage_output, received)
                     if isinstance(o, torch.Tensor)]
            outs1 = [o for o, _ in pairs]
            grads1 = [g for _, g in pairs]
        m0, m1 = f_stage.submod, b_stage.submod
        fb = self._fb_function(type(m0))
        ran: list[bool] = []

        def interleaved(*inputs: torch.Tensor) -> Any:
            # called by forward_one_chunk in place of m0.forward, exactly once
            outputs0, _ = fb(m0, list(inputs), None, [], m1, loss1, outs1, grads1)
            ran.append(True)
            outputs0 = list(outputs0)
            return outputs0[0] if len(outputs0) == 1 else tuple(outputs0)

        had = "forward" in m0.__dict__
        saved = m0.__dict__.get("forward")
        m0.forward = interleaved
        try:
            self._forward(sched, stages, f_stage, mb0, ctx)
        finally:
            if had:
                m0.forward = saved
            else:
                del m0.forward
        if len(ran) != 1:
            raise RuntimeError(f"internal: stage {fwd.stage_index}'s forward_one_chunk called "
                               f"the module {len(ran)} times (expected once)")
        # the rest of backward_one_chunk: input gradients for the send / local hand-off
        grads_input = []
        for v in input_values:
            if isinstance(v, torch.Tensor):
                grads_input.append(v.grad)
                v.grad = None
            else:
                grads_input.append(None)
        # keyword inputs get no gradient sent: keep the positional arguments' (torch
        # >= 2.13 counts them in _stage_meta, earlier ones in args_recv_info)
        meta = getattr(b_stage, "_stage_meta", None)
        recv_info = getattr(b_stage, "args_recv_info", None) or {}
        if getattr(meta, "inputs", None) is not None:
            n_args = len(meta.inputs)
        elif mb1 in recv_info:
            n_args = len(recv_info[mb1])
        else:
            n_args = len(grads_input)
        b_stage.bwd_cache[mb1] = tuple(grads_input[:n_args])
        if b_stage.is_last and not b_stage.is_first:
            for t in stage_output:  # free the graph context, as torch does
                if isinstance(t, torch.Tensor) and not t._is_view():
                    t.detach_()
        if getattr(b_stage, "dw_builder", None):
            b_stage.dw_builder()()
        sched.backward_counter[b_stage.stage_index] += 1
        prev = stages.get(b_stage.stage_index - 1)
        if prev is not None:
            prev.set_local_bwd_input(b_stage.get_local_bwd_output(mb1), mb1)

    def _fb_function(self, cls: type) -> Callable[..., Any]:
        from .fb import SubStageModule
        if issubclass(cls, SubStageModule) and \
                cls.overlapped_forward_backward.__func__ is \
                SubStageModule.overlapped_forward_backward.__func__:
            order, tl = self.order, self.timeline

            def run(*args: Any) -> Any:
                return overlapped_forward_backward(*args, order=order, timeline=tl)
            return run
        return cls.overlapped_forward_backward


def register_overlapped_forward_backward(schedule: Any, *, order: OrderSpec | None = None,
                                         timeline: Timeline | None = None) -> TorchOverlapFB:
    """Register :class:`TorchOverlapFB` as ``schedule``'s ``OVERLAP_F_B`` function and
    return it (its ``calls``/``plain`` counters say what ran).

    ``schedule``: a ``torch.distributed.pipelining`` schedule with
    ``register_custom_function`` (a ``_PipelineScheduleRuntime`` such as
    ``ScheduleDualPipeV``).  Raises ``RuntimeError`` when the installed torch lacks
    ``OVERLAP_F_B`` custom functions, ``TypeError`` for another kind of schedule.
    """
    S = _types()
    if not isinstance(schedule, S._PipelineScheduleRuntime):
        raise TypeError(f"register_overlapped_forward_backward needs a torch.distributed."
                        f"pipelining schedule that runs OVERLAP_F_B actions (e.g. "
                        f"ScheduleDualPipeV), got {type(schedule).__name__}")
    fn = TorchOverlapFB(order=order, timeline=timeline)
    schedule.register_custom_function(S.OVERLAP_F_B, fn)
    return fn
