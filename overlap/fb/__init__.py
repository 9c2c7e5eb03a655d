"""Interleave the sub-stages of a forward chunk and a backward chunk (DualPipe's F&B).

A stage is declared as an ordered list of **sub-stages**, each ``compute`` or ``comm``
(a DeepSeek-V3 MoE layer: attention → dispatch all-to-all → experts → combine
all-to-all).  A ``comm`` sub-stage is asynchronous: its forward *starts* the
communication and returns a :class:`CommHandle`; whoever needs the result waits on the
handle later.  Its backward is a communication too (the all-to-all of the gradients),
declared by the user, also returning a handle.  A ``compute`` sub-stage is an ordinary
differentiable function; its backward is autograd's, run **per sub-stage** on the
sub-stage's own saved inputs and outputs, optionally with its weight-gradient part
deferred to a separate ``W`` step.

Where each part lives (every public name is importable from ``overlap.fb``):

* :mod:`overlap.fb.handles` -- :class:`CommHandle` (a communication in flight) and
  :func:`run_async`;
* :mod:`overlap.fb.substages` -- the declarations :class:`SubStage`, :func:`compute`,
  :func:`comm`, and the interleaving order: :class:`Step`, :func:`build_order`;
* :mod:`overlap.fb.weight_grads` -- deferred weight gradients: the process's one
  :class:`WeightGradStore` (the published DualPipe API; ``dualpipe.WeightGradStore`` is
  this class), :func:`defer_weight_grad` and the collector behind a ``W`` step;
* :mod:`overlap.fb.graph` -- autograd plumbing: the forward cut at sub-stage boundaries,
  the node tying it to the module's outputs, and why the backward can run per sub-stage;
* :mod:`overlap.fb.programs` -- the forward and backward programs run one step at a time
  (plain and interleaved), on which streams, and the timeline lanes they record;
* :mod:`overlap.fb.module` -- :class:`SubStageModule`, :func:`run_substages`,
  :func:`overlapped_forward_backward` (the DualPipe contract) and
  :func:`plain_forward_backward`.
"""

from .handles import CommHandle, run_async
from .module import (SubStageModule, overlapped_forward_backward, plain_forward_backward,
                     run_substages)
from .programs import FB_WINDOW_LANE, SUBSTAGE_COMM_LANE, SUBSTAGE_COMPUTE_LANE
from .substages import COMM, COMPUTE, POLICIES, OrderSpec, Step, SubStage, build_order, comm, compute
from .weight_grads import WeightGradStore, defer_weight_grad

__all__ = [
    "COMPUTE", "COMM", "SUBSTAGE_COMPUTE_LANE", "SUBSTAGE_COMM_LANE", "FB_WINDOW_LANE",
    "CommHandle", "run_async", "SubStage", "compute", "comm", "Step", "build_order",
    "SubStageModule", "run_substages", "overlapped_forward_backward",
    "plain_forward_backward", "defer_weight_grad", "WeightGradStore",
]
