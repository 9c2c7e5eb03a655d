"""Stages that exercise what training jobs put inside a stage: activation checkpointing
(plain and selective), custom autograd with WeightGradStore, bf16, torch.compile."""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from torch.utils.checkpoint import checkpoint

from dualpipe import WeightGradStore
from dualpipe.weight_grad import eager_region
from tests.models import microbatch_losses

D = 8
MB = 2


class WGSLinear(torch.autograd.Function):
    """``x W^T + b`` deferring its weight gradient through WeightGradStore, as the
    published DualPipe example's LinearFunc does (accumulating into the parameter
    objects, which stays right under activation checkpointing)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.params = (weight, bias)
        return Fn.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        w_param, b_param = ctx.params

        @torch.no_grad()
        def weight_grad():
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            for p, grad in ((w_param, g2.t() @ x2), (b_param, g2.sum(0))):
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad += grad

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return g @ weight, None, None


@eager_region  # deferral decided at run time, also inside a torch.compile'd stage
def _wgs_linear(x, weight, bias):
    return WGSLinear.apply(x, weight, bias)


class Body(nn.Module):
    def __init__(self, stage: int, linear: str):
        super().__init__()
        g = torch.Generator().manual_seed(2000 + stage)
        self.l1, self.l2 = nn.Linear(D, D), nn.Linear(D, D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.linear = linear

    def _lin(self, m: nn.Linear, x):
        return _wgs_linear(x, m.weight, m.bias) if self.linear == "wgs" else m(x)

    def forward(self, x):
        return self._lin(self.l2, torch.tanh(self._lin(self.l1, x))) + x


def _sac_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy
    keep = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
    return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE


def _sac_context():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(_sac_policy)


class ComposeStage(nn.Module):
    """``body``: "plain", "ckpt" (non-reentrant checkpoint of the whole body) or "sac"
    (selective: matmul outputs saved, the rest recomputed)."""

    def __init__(self, stage: int, body: str = "plain", linear: str = "nn"):
        super().__init__()
        self.body = Body(stage, linear)
        self.mode = body

    def forward(self, x):
        if self.mode == "ckpt":
            return checkpoint(self.body, x, use_reentrant=False)
        if self.mode == "sac":
            return checkpoint(self.body, x, use_reentrant=False, context_fn=_sac_context)
        return self.body(x)


def make_stage(stage: int, case: dict) -> nn.Module:
    m = ComposeStage(stage, case.get("body", "plain"), case.get("linear", "nn"))
    if case.get("dtype") == "bf16":
        m = m.to(torch.bfloat16)
    if case.get("compile"):
        m = torch.compile(m, backend=case["compile"])
    return m


def criterion(y, label):
    return Fn.mse_loss(y.float(), label.float())


def batch(step: int, N: int, case: dict):
    g = torch.Generator().manual_seed(70 + step)
    x, y = torch.randn(N * MB, D, generator=g), torch.randn(N * MB, D, generator=g)
    if case.get("dtype") == "bf16":
        x, y = x.to(torch.bfloat16), y.to(torch.bfloat16)
    return x, y


def autocast(case: dict):
    if case.get("autocast"):
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reference(num_stages: int, N: int, case: dict, steps: int = 1):
    """Single process, the same micro-batches in order: losses per step, stage grads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = [make_stage(s, dict(case, compile=None)) for s in range(num_stages)]
        losses = []
        for step in range(steps):
            x, y = batch(step, N, case)
            losses.append(microbatch_losses(stages, x, y, N, criterion, MB,
                                            lambda: autocast(case)))
        grads = {s: {n: p.grad.clone() for n, p in st.named_parameters()}
                 for s, st in enumerate(stages)}
        return losses, grads
    finally:
        torch.set_num_threads(threads)


def run_case(rank: int, world: int, case: dict):
    """One case on this rank: the pipeline's losses and stage grads."""
    from dualpipe import DualPipe, DualPipeV, Pipeline
    from dualpipe.schedules import get_schedule
    name, N = case["schedule"], case["chunks"]
    deferred = [0]
    put = WeightGradStore.put.__func__

    def counting_put(cls, fn):  # how many weight gradients really went to a W pass
        deferred[0] += 1
        put(cls, fn)

    WeightGradStore.put = classmethod(counting_put)
    s = get_schedule(name, world, N)
    mods = [make_stage(stage, case) for (_st, stage) in s.placement[rank]]
    kw = dict(timeout=120, split_linear_weight_grads=case.get("split", False))
    cls = {"dualpipe": DualPipe, "dualpipev": DualPipeV}.get(name)
    p = cls(mods, **kw) if cls else Pipeline(mods[0], schedule=name, **kw)
    ins, outs = s.input_microbatches(rank), s.loss_microbatches(rank)
    losses = []
    for step in range(case.get("steps", 1)):
        x, y = batch(step, N, case)
        inputs = () if ins is None else (x[ins.start * MB:ins.stop * MB],)
        labels = () if outs is None else (y[outs.start * MB:outs.stop * MB],)
        with autocast(case):
            loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                             labels=labels)
        losses.append(loss)
    grads = {}
    for c, (_st, stage) in enumerate(s.placement[rank]):
        grads.setdefault(stage, []).append({n.replace("_orig_mod.", ""): q.grad.clone()
                                            for n, q in p.module[c].named_parameters()
                                            if q.grad is not None})
    WeightGradStore.put = classmethod(put)
    return {"losses": losses, "loss_slice": None if outs is None else (outs.start, outs.stop),
            "grads": grads, "deferred": deferred[0]}


def run_cases(rank: int, world: int, cases: list[dict]):
    return [run_case(rank, world, c) for c in cases]
