"""Stage modules for runtime tests and the single-process reference they are checked
against (the same micro-batches through all stages in one process)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as Fn

from dualpipe.utils import cosine_distance  # noqa: F401 - re-exported for the tests

D = 8      # feature size
MB = 2     # rows per micro-batch


class Stage(nn.Module):
    """A residual MLP block; with ``tuple_io`` it passes (x, z, tag): a float32
    activation, a float64 activation and an int64 tag that needs no gradient."""

    def __init__(self, stage: int, tuple_io: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(1000 + stage)
        self.l1 = nn.Linear(D, D)
        self.l2 = nn.Linear(D, D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.tuple_io = tuple_io
        if tuple_io:
            self.zw = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64) * 0.1)

    def forward(self, x, z=None, tag=None):
        y = self.l2(torch.tanh(self.l1(x))) + x
        if not self.tuple_io:
            return y
        z2 = z * torch.cos(self.zw) + y.detach().double() * 0.01 + y.double().sum(-1, keepdim=True) * 0.001
        return y, z2, tag + 1


class HookStage(Stage):
    """Defines ``overlapped_forward_backward`` (the published contract): the runtime
    must call it for every F&B pair when both of a rank's stages are of this class."""

    calls = 0

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0,
                                    module1, loss1, outputs1, output_grads1):
        cls.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:
            # outputs1 may have had their data released after sending: use the
            # engine-level run_backward, as the published example does
            from dualpipe.utils import run_backward
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(*args):
    """Last-stage loss: ``criterion(*outputs, *labels)``."""
    if len(args) == 2:
        y, label = args
        return Fn.mse_loss(y, label)
    y, z, tag, label = args
    return Fn.mse_loss(y, label) + (z.pow(2).mean() * 0.1).float() + tag.float().mean() * 0


def make_batch(step: int, num_chunks: int, tuple_io: bool):
    g = torch.Generator().manual_seed(7 + step)
    n = num_chunks * MB
    x = torch.randn(n, D, generator=g)
    y = torch.randn(n, D, generator=g)
    if tuple_io:
        z = torch.randn(n, 1, generator=g, dtype=torch.float64)
        tag = torch.arange(n, dtype=torch.int64).unsqueeze(1)
        return (x, z, tag), (y,)
    return (x,), (y,)


def microbatch_losses(stages, x: torch.Tensor, y: torch.Tensor, num_chunks: int, crit,
                      rows: int = MB, context=None) -> torch.Tensor:
    """One process: each of ``num_chunks`` micro-batches (``rows`` rows of ``x``/``y``)
    through every stage in order, its loss backpropagated at once, as a pipeline
    schedule does them; returns the per-micro-batch losses (``float[num_chunks]``).
    ``context``: a callable giving a context manager for each forward (autocast)."""
    import contextlib
    out = []
    for i in range(num_chunks):
        with (context() if context is not None else contextlib.nullcontext()):
            h = x[i * rows:(i + 1) * rows]
            for st in stages:
                h = st(h)
            loss = crit(h, y[i * rows:(i + 1) * rows])
        loss.backward()
        out.append(loss.detach())
    return torch.stack(out)


def reference(num_stages: int, num_chunks: int, steps: int, tuple_io: bool,
              train: bool = True):
    """Single process: per micro-batch losses/outputs of every step and the stage grads
    accumulated over the steps.  Runs with one thread, as the ranks do."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = [Stage(s, tuple_io) for s in range(num_stages)]
        losses, outputs = [], []
        for st in range(steps):
            xs, ys = make_batch(st, num_chunks, tuple_io)
            xs_mb = list(zip(*[x.tensor_split(num_chunks) for x in xs]))
            ys_mb = list(zip(*[y.tensor_split(num_chunks) for y in ys]))
            step_losses, step_outs = [], []
            for i in range(num_chunks):
                with torch.set_grad_enabled(train):
                    h = xs_mb[i]
                    for s in stages:
                        h = s(*h)
                        h = (h,) if isinstance(h, torch.Tensor) else h
                    loss = criterion(*h, *ys_mb[i])
                if train:
                    loss.backward()
                step_losses.append(loss.detach())
                step_outs.append(tuple(t.detach() for t in h))
            losses.append(torch.stack(step_losses))
            outputs.append(step_outs)
        grads = {s: {n: p.grad.clone() for n, p in st.named_parameters() if p.grad is not None}
                 for s, st in enumerate(stages)}
        return losses, outputs, grads
    finally:
        torch.set_num_threads(threads)


def sum_stage_grads(per_rank_grads) -> dict[int, dict[str, torch.Tensor]]:
    """``{stage: {param: grad}}`` summed over every copy on every rank (a DualPipe
    stage's gradient is the sum of its two copies'); input: one ``{stage: [copies]}``
    per rank."""
    total: dict[int, dict[str, torch.Tensor]] = {}
    for grads in per_rank_grads:
        for stage, copies in grads.items():
            for g in copies:
                acc = total.setdefault(stage, {})
                for n, t in g.items():
                    acc[n] = acc[n] + t if n in acc else t.clone()
    return total
