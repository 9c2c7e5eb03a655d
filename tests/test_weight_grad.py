"""split_linear_weight_grads: deferred weight gradients go through autograd's accumulator,
so hooks on gradient accumulation see them (single process, WeightGradStore directly)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from dualpipe import WeightGradStore
from dualpipe.weight_grad import split_linear_weight_grads, unsplit_linear_weight_grads


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 3))


def _hooked(model, recording=(True,)):
    """Record gradient hooks while ``recording[0]``.  (During an input-gradient-only
    backward autograd also calls a parameter's hooks once with no gradient -- as for any
    custom Function that returns None for a parameter; the test records the W pass.)"""
    seen = []

    def post(q, n):
        if recording[0]:
            seen.append(("post", n, q.grad.sum().item()))

    def pre(g, n):  # returns None: the gradient is left as it is
        if recording[0]:
            seen.append(("pre", n, g is None))

    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda q, n=name: post(q, n))
        p.register_hook(lambda g, n=name: pre(g, n))
    return seen


def test_deferred_gradients_run_accumulation_hooks_once_per_weight_pass():
    ref, split = _model(), _model()
    assert split_linear_weight_grads(split) == 2
    WeightGradStore.clear()
    in_w = [False]
    seen_ref, seen = _hooked(ref), _hooked(split, in_w)
    x = torch.randn(5, 4)
    for step in range(2):  # the second pass accumulates onto existing .grad
        ref(x).square().sum().backward()
        WeightGradStore.enabled = True
        try:
            xi = x.clone().requires_grad_(True)
            split(xi).square().sum().backward()          # input gradient only
        finally:
            WeightGradStore.enabled = False
        assert xi.grad is not None
        if step == 0:
            assert all(p.grad is None for p in split.parameters()), "W ran before its pass"
        fns = WeightGradStore.take()
        assert len(fns) == 2
        in_w[0] = True
        for fn in fns:                                   # the W pass
            fn()
        in_w[0] = False
    # every parameter's hooks ran once per weight pass with its gradient, as for the
    # plain module (post hooks saw the accumulated .grad: same sums within rounding)
    key = [(k, n) for k, n, *_ in sorted(seen)]
    assert key == [(k, n) for k, n, *_ in sorted(seen_ref)] and len(seen) == 2 * 2 * 4
    for a, b in zip(sorted(seen), sorted(seen_ref)):
        if a[0] == "post":
            assert abs(a[2] - b[2]) <= 1e-5 * max(1.0, abs(b[2])), (a, b)
    for (n, p), (_, q) in zip(ref.named_parameters(), split.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=n)


def test_not_deferred_is_plain_autograd():
    ref, split = _model(), _model()
    split_linear_weight_grads(split)
    WeightGradStore.clear()
    seen_ref, seen = _hooked(ref), _hooked(split)
    x = torch.randn(3, 4)
    ref(x).sum().backward()
    split(x).sum().backward()                            # store disabled: nothing deferred
    assert WeightGradStore.take() == []
    assert [x[:2] for x in sorted(seen)] == [x[:2] for x in sorted(seen_ref)]
    for p, q in zip(ref.parameters(), split.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7)


def test_deepcopy_of_a_split_module_still_defers():
    WeightGradStore.clear()
    split = _model()
    split_linear_weight_grads(split)
    clone = copy.deepcopy(split)
    WeightGradStore.enabled = True
    try:
        clone(torch.randn(2, 4, requires_grad=True)).sum().backward()
    finally:
        WeightGradStore.enabled = False
    assert len(WeightGradStore.take()) == 2


def _deferred_count(model) -> int:
    """How many weight-gradient closures one backward with the store enabled defers."""
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    finally:
        WeightGradStore.enabled = False
    return len(WeightGradStore.take())


def test_unsplit_undoes_split_and_only_split():
    m = _model()
    assert split_linear_weight_grads(m) == 2
    assert split_linear_weight_grads(m) == 0  # already split: nothing changes
    assert _deferred_count(m) == 2
    assert unsplit_linear_weight_grads(m) == 2
    assert unsplit_linear_weight_grads(m) == 0
    assert _deferred_count(m) == 0  # weight gradients in the backward again
    assert m[0].weight.grad is not None and m[2].weight.grad is not None
    own = nn.Linear(4, 4)
    own.forward = lambda x: x  # a forward someone else set on the layer
    assert unsplit_linear_weight_grads(own) == 0 and "forward" in own.__dict__
    clone = copy.deepcopy(_model())
    split_linear_weight_grads(clone)
    assert unsplit_linear_weight_grads(copy.deepcopy(clone)) == 2  # copies too
