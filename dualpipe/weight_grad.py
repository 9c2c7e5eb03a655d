"""Deferred weight gradients (the zero-bubble "W" pass).

:class:`WeightGradStore` is the one store of :mod:`overlap.fb.weight_grads` (the same class,
re-exported here and as ``dualpipe.WeightGradStore``), with the published API that custom
autograd functions are written against (``enabled``, ``put``, ``flush``, ``pop``,
``clear``): while ``WeightGradStore.enabled`` is true, a backward that supports deferral
calls ``WeightGradStore.put(fn)`` with a closure computing its weight gradient instead of
computing it.  The runtime enables the store for ``I`` actions, takes the closures
collected during that backward (:meth:`WeightGradStore.take`) and runs them in the
matching ``W`` action; user code that calls ``flush``/``pop`` itself gets the published
first-in first-out behaviour.  Closures deferred inside an overlapped F&B pair
(``overlap.fb``) go through the same store.

:func:`split_linear_weight_grads` is the opt-in that needs no custom autograd code: it
makes every ``nn.Linear`` of a module defer its weight (and bias) gradient.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torch.autograd import Variable

from overlap.fb import WeightGradStore

__all__ = ["WeightGradStore", "split_linear_weight_grads", "unsplit_linear_weight_grads",
           "eager_region"]


class _LinearDeferW(torch.autograd.Function):
    """``y = x W^T + b`` whose weight/bias gradients go to the store when it is enabled."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        # the parameters themselves (leaves: no reference cycle) receive the deferred
        # gradients; the saved ``weight`` may be an alias of the parameter (activation
        # checkpointing recomputes saved tensors), and once the graph is freed an alias
        # accumulates into its own ``.grad``, losing the gradient
        ctx.weight = weight
        ctx.bias = bias
        return Fn.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gy @ weight if ctx.needs_input_grad[0] else None
        need_w, need_b = ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]

        @torch.no_grad()
        def weight_grad():
            g2 = gy.reshape(-1, gy.shape[-1])
            leaves, grads = [], []
            if need_w:
                leaves.append(ctx.weight)
                grads.append(g2.t() @ x.reshape(-1, x.shape[-1]))
            if need_b:
                leaves.append(ctx.bias)
                grads.append(g2.sum(0))
            # accumulate through autograd's own accumulator (8 us instead of 3 for a
            # plain `.grad +=`), so hooks on the parameters' gradient accumulation --
            # register_hook, register_post_accumulate_grad_hook, DDP/FSDP-style
            # accumulator hooks -- see the deferred gradients as they see any other
            _accumulate(tuple(leaves), tuple(grads))

        if WeightGradStore.enabled and (need_w or need_b):
            WeightGradStore.put(weight_grad)
            return gx, None, None
        g2 = gy.reshape(-1, gy.shape[-1])
        gw = g2.t() @ x.reshape(-1, x.shape[-1]) if need_w else None
        gb = g2.sum(0) if need_b else None
        return gx, gw, gb


def _accumulate(leaves: tuple, grads: tuple) -> None:
    Variable._execution_engine.run_backward(
        leaves, grads, keep_graph=False, create_graph=False, inputs=(),
        allow_unreachable=True, accumulate_grad=True)


def eager_region(fn):
    """Run ``fn`` outside ``torch.compile`` (a graph break around it).

    A deferrable backward decides at run time whether ``WeightGradStore`` is enabled (the
    runtime enables it only around an input-gradient pass).  Traced into a compiled
    graph, that decision is taken once, when the graph is built, with the store off, so
    the weight gradient is never deferred (still correct, but the W passes are empty).
    Wrap the function that applies a deferrable autograd Function with this (as
    :func:`split_linear_weight_grads` does) to keep the deferral under ``torch.compile``.
    """
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


@eager_region
def _deferred_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _LinearDeferW.apply(x, self.weight, self.bias)


def split_linear_weight_grads(module: nn.Module) -> int:
    """Make every ``nn.Linear`` in ``module`` defer its weight gradient to the W pass
    when the runtime runs an input-gradient-only backward.  The gradients are the same
    products, accumulated into ``.grad`` by autograd's accumulator (equal to autograd's
    within float rounding), so hooks on a parameter's gradient accumulation run for
    deferred gradients too, once per deferred W.  (During the input-gradient-only
    backward autograd also calls those hooks once with no gradient, as for any custom
    Function that returns None for a parameter.)  Returns how many layers changed."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear and "forward" not in m.__dict__:
            m.forward = _deferred_forward.__get__(m, nn.Linear)
            n += 1
    return n


def unsplit_linear_weight_grads(module: nn.Module) -> int:
    """Undo :func:`split_linear_weight_grads`: every ``nn.Linear`` it changed computes its
    weight gradient in the backward again.  A forward set on a layer by anything else is
    left alone.  Returns how many layers changed."""
    n = 0
    for m in module.modules():
        if type(m) is nn.Linear and \
                getattr(m.__dict__.get("forward"), "__func__", None) is _deferred_forward:
            del m.forward
            n += 1
    return n
