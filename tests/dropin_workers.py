"""Rank functions for the drop-in tests: the published examples' calling convention
(``deepseek-ai/DualPipe``'s ``examples/example_dualpipe.py`` and ``example_dualpipev.py``)
transcribed for CPU ranks, and argument-handling cases around it.

The transcription keeps what a user's code does with the API -- stages passed as one
``nn.Sequential``, ``set_p2p_tensor_shapes`` / ``set_p2p_tensor_dtype`` declared,
``step(x, num_chunks=, criterion=, labels=(l,), return_outputs=)`` called on every rank
with ``x = l = None`` on the ranks that hold no first/last stage, a custom autograd linear
that defers its weight gradient through ``WeightGradStore``, the
``overlapped_forward_backward`` classmethod, the published cosine check of gradients
(for DualPipe after adding the partner rank's copy of each stage) and the inference step
under ``torch.no_grad()`` -- with sizes small enough for CPU tests.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as Fn

from dualpipe import WeightGradStore
from dualpipe.utils import run_backward


class _Linear(torch.autograd.Function):
    """``x @ w.T`` whose weight gradient goes to ``WeightGradStore`` while it is enabled
    (the zero-bubble W pass), as the published example's linear does."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return Fn.linear(x, w)

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        if w.grad is None:
            w.grad = torch.zeros_like(w)

        def weight_grad():
            w.grad += gy.flatten(0, -2).T @ x.flatten(0, -2)

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
        else:
            weight_grad()
        return gy @ w, None


class DeferredLinear(nn.Linear):
    def forward(self, x):
        return _Linear.apply(x, self.weight)


class ExampleStage(nn.Module):
    """hidden -> 4 hidden -> gelu -> hidden, no biases."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear1 = DeferredLinear(hidden, 4 * hidden, bias=False)
        self.linear2 = DeferredLinear(4 * hidden, hidden, bias=False)

    def forward(self, x):
        return self.linear2(Fn.gelu(self.linear1(x)))

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0,
                                    module1, loss1, outputs1, output_grads1):
        # the contract's plain form: forward one chunk, then backward the other
        out0 = module0(*inputs0)
        out0 = [out0] if isinstance(out0, torch.Tensor) else out0
        loss0 = criterion0(*out0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return out0, loss0


def example_criterion(out, target):
    return Fn.mse_loss(out, target).clone()


def reference_step(x, l, model, chunks):
    """The whole model in one process, micro-batch by micro-batch."""
    losses, outs = [], []
    for xm, lm in zip(x.chunk(chunks), l.chunk(chunks)):
        y = model(xm)
        loss = example_criterion(y, lm)
        loss.backward()
        losses.append(loss.detach())
        outs.append(y.detach())
    return torch.stack(losses), torch.cat(outs)


def cos_diff(a, b) -> float:
    """The published gradient measure: ``1 - 2 a.b / (a.a + b.b)``."""
    a, b = a.double(), b.double()
    return 1 - 2 * (a * b).sum().item() / (a * a + b * b).sum().item()


def published_example(rank: int, world: int, schedule: str, num_chunks: int = 20,
                      micro_batch_size: int = 3, seq_len: int = 4, hidden: int = 8):
    """One run of the published example's ``main(rank, pp_size)`` for ``schedule``
    ("dualpipe" or "dualpipev"); returns what the parent checks."""
    from dualpipe import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    dual = schedule == "dualpipe"
    first, last = rank == 0, rank == world - 1
    torch.manual_seed(233)
    set_p2p_tensor_shapes([(micro_batch_size, seq_len, hidden)])
    set_p2p_tensor_dtype(torch.float32)
    nstages = world if dual else 2 * world
    full = nn.Sequential(*[ExampleStage(hidden) for _ in range(nstages)])
    full_x = torch.randn(num_chunks * micro_batch_size, seq_len, hidden)
    full_l = torch.randn(num_chunks * micro_batch_size, seq_len, hidden)
    loss_ref, out_ref = reference_step(full_x, full_l, full, num_chunks)

    local_full = nn.Sequential(full[rank], full[nstages - 1 - rank])
    local = nn.Sequential(ExampleStage(hidden), ExampleStage(hidden))
    local[0].load_state_dict(local_full[0].state_dict())
    local[1].load_state_dict(local_full[1].state_dict())
    model = (DualPipe if dual else DualPipeV)(local)

    if dual:
        # rank 0 feeds the first half and scores the second; the last rank the reverse
        x = full_x.chunk(2)[0] if first else full_x.chunk(2)[1] if last else None
        l = full_l.chunk(2)[1] if first else full_l.chunk(2)[0] if last else None
        want = loss_ref.chunk(2)[1] if first else loss_ref.chunk(2)[0] if last else None
        want_out = out_ref.chunk(2)[1] if first else out_ref.chunk(2)[0] if last else None
    else:
        x, l = (full_x, full_l) if first else (None, None)
        want, want_out = (loss_ref, out_ref) if first else (None, None)
    res = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss, outputs = model.step(x, num_chunks=num_chunks, criterion=example_criterion,
                                   labels=(l,), return_outputs=False)
    res["warnings"] = [str(w.message) for w in caught]
    res["train_loss_ok"] = (loss is None) if want is None else bool(torch.equal(loss, want))
    res["train_outputs_none"] = outputs is None
    if dual:  # each stage's gradient is the sum of its two copies' (rank r and P-1-r)
        for p0, p1 in zip(local[0].parameters(), local[1].parameters()):
            all0 = [torch.empty_like(p0) for _ in range(world)]
            all1 = [torch.empty_like(p1) for _ in range(world)]
            dist.all_gather(all0, p0.grad)
            dist.all_gather(all1, p1.grad)
            p0.grad += all1[world - 1 - rank]
            p1.grad += all0[world - 1 - rank]
    res["grad_diffs"] = [cos_diff(p.grad, q.grad)
                         for p, q in zip(local.parameters(), local_full.parameters())]
    model.zero_grad()
    with torch.no_grad():
        loss, outputs = model.step(x, num_chunks=num_chunks, criterion=example_criterion,
                                   labels=(l,), return_outputs=True)
    res["infer_loss_ok"] = (loss is None) if want is None else bool(torch.equal(loss, want))
    res["infer_outputs_ok"] = (outputs is None) if want_out is None else \
        bool(torch.equal(outputs, want_out))
    set_p2p_tensor_shapes(None)
    set_p2p_tensor_dtype(None)
    return res


def module_containers(rank: int, world: int):
    """Every container the reference accepts for the two stages builds the same pipeline,
    and a wrong count says what was passed."""
    from dualpipe import DualPipeV, Pipeline
    from tests.models import Stage
    out = {}
    a, b = Stage(rank), Stage(2 * world - 1 - rank)
    for kind, mods in (("tuple", (a, b)), ("list", [a, b]), ("ModuleList", nn.ModuleList([a, b])),
                       ("Sequential", nn.Sequential(a, b))):
        p = DualPipeV(mods, timeout=30)
        out[kind] = (p.module[0] is a and p.module[1] is b,
                     sorted(p.state_dict()) == sorted(
                         [f"module.0.{k}" for k in a.state_dict()]
                         + [f"module.1.{k}" for k in b.state_dict()]))
    for kind, mods in (("three", nn.Sequential(a, b, Stage(0))), ("one", a)):
        try:
            DualPipeV(mods, timeout=30)
            out[kind] = "built"
        except ValueError as e:
            out[kind] = str(e)
    # one stage per rank: a Sequential is the stage itself, a ModuleList holds it
    seq = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
    out["pipeline_sequential"] = Pipeline(seq, schedule="1f1b").module[0] is seq
    out["pipeline_modulelist"] = Pipeline(nn.ModuleList([seq]), schedule="1f1b").module[0] is seq
    return out


def _seq_stage(stage: int, hidden: int) -> nn.Module:
    torch.manual_seed(300 + stage)
    return nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())


def _outcome(fn):
    import time
    t = time.monotonic()
    try:
        out = fn()
        return ("ok", out, time.monotonic() - t)
    except Exception as e:  # noqa: BLE001 - reported to the parent
        return (type(e).__name__, str(e), time.monotonic() - t)


def declared_shapes(rank: int, world: int, mb: int = 2, hidden: int = 4, N: int = 4):
    """DualPipeV with the published convention (every rank passes x / criterion /
    labels=(l,), None where unused) while the sequence length changes between steps,
    with and without set_p2p_tensor_shapes declared.  Returns per step what happened
    and rank 0's losses next to a single-process run of the same micro-batches."""
    from dualpipe import DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes
    stages = [_seq_stage(s, hidden) for s in range(2 * world)]
    p = DualPipeV(nn.Sequential(_seq_stage(rank, hidden), _seq_stage(2 * world - 1 - rank,
                                                                       hidden)), timeout=20)

    def batch(seq, rows=N * mb):
        g = torch.Generator().manual_seed(seq * 10 + rows)
        return torch.randn(rows, seq, hidden, generator=g), torch.randn(rows, seq, hidden,
                                                                         generator=g)

    def ref(seq):
        x, l = batch(seq)
        out = []
        for xm, lm in zip(x.chunk(N), l.chunk(N)):
            h = xm
            for st in stages:
                h = st(h)
            out.append(Fn.mse_loss(h, lm).detach())
        return torch.stack(out)

    def step(seq, rows=N * mb):
        x, l = batch(seq, rows)
        if rank != 0:
            x = l = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss, _ = p.step(x, num_chunks=N, criterion=Fn.mse_loss, labels=(l,))
        assert not caught, [str(w.message) for w in caught]
        return None if loss is None else bool(torch.equal(loss, ref(seq)))

    res = {}
    set_p2p_tensor_shapes([(mb, 8, hidden)])
    set_p2p_tensor_dtype(torch.float32)
    res["declared"] = _outcome(lambda: step(8))
    res["new_seq"] = _outcome(lambda: step(12))          # refused at the start, every rank
    res["same_again"] = _outcome(lambda: step(8))        # the pipeline is still usable
    res["indivisible"] = _outcome(lambda: step(8, rows=N * mb - 1))
    set_p2p_tensor_shapes([(mb, 12, hidden)])            # declared anew: accepted
    res["redeclared"] = _outcome(lambda: step(12))
    set_p2p_tensor_shapes(None)
    set_p2p_tensor_dtype(None)
    res["free"] = [_outcome(lambda s=s: step(s)) for s in (8, 12, 5, 8, 12)]
    # a declaration that is wrong from the start is found at the first send (mid-step)
    set_p2p_tensor_shapes([(mb, 8, hidden + 1)])
    res["wrong"] = _outcome(lambda: step(8))
    set_p2p_tensor_shapes(None)
    return res


def many_lengths(rank: int, world: int, mb: int = 2, hidden: int = 4, N: int = 4):
    """More sequence lengths than the pipeline keeps boundary shapes for (the limit set
    to 3 here): every rank forgets the same signatures, and a length seen again after
    being forgotten has its shapes exchanged anew.  Rank 0's losses against one process."""
    from dualpipe import DualPipeV
    from dualpipe.runtime import checks  # _remember_signature reads the limit there
    checks.MAX_SIGNATURES = 3
    stages = [_seq_stage(s, hidden) for s in range(2 * world)]
    p = DualPipeV((_seq_stage(rank, hidden), _seq_stage(2 * world - 1 - rank, hidden)),
                  timeout=20)
    out = []
    for seq in (3, 5, 7, 9, 3, 5, 11, 3, 3):
        g = torch.Generator().manual_seed(seq)
        x, l = torch.randn(N * mb, seq, hidden, generator=g), torch.randn(N * mb, seq, hidden,
                                                                           generator=g)
        loss, _ = p.step(x if rank == 0 else None, num_chunks=N, criterion=Fn.mse_loss,
                         labels=(l if rank == 0 else None,))
        if rank == 0:
            ref = []
            for xm, lm in zip(x.chunk(N), l.chunk(N)):
                h = xm
                for st in stages:
                    h = st(h)
                ref.append(Fn.mse_loss(h, lm).detach())
            out.append(bool(torch.equal(loss, torch.stack(ref))))
        out.append(len(p._sig_keys))
    return out


class _DetachesOnce(nn.Module):
    """Detaches its output in its second forward only: its input's gradient is None for
    that micro-batch and not for the others."""

    def __init__(self, stage: int, hidden: int):
        super().__init__()
        self.inner = _seq_stage(stage, hidden)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = self.inner(x)
        return y.detach() if self.calls == 2 else y


def none_layout_changes(rank: int, world: int, hidden: int = 4, N: int = 4):
    """DualPipeV, 2 ranks: stage 1 (rank 1) detaches one micro-batch's output, so which of
    its input gradients are None differs between micro-batches: every rank must raise
    PipelineError saying so (never a wrong gradient)."""
    from dualpipe import DualPipeV
    mods = ((_seq_stage(0, hidden), _seq_stage(3, hidden)) if rank == 0
            else (_DetachesOnce(1, hidden), _seq_stage(2, hidden)))
    p = DualPipeV(mods, timeout=20)
    x, l = torch.randn(N * 2, hidden), torch.randn(N * 2, hidden)
    return _outcome(lambda: p.step(x if rank == 0 else None, num_chunks=N,
                                   criterion=Fn.mse_loss, labels=(l if rank == 0 else None,)))


class _NarrowsOnce(_DetachesOnce):
    """Returns one column fewer in its second forward: another shape, same inputs."""

    def forward(self, x):
        self.calls += 1
        y = self.inner(x)
        return y[:, :-1].clone() if self.calls == 2 else y


def output_shape_changes(rank: int, world: int, hidden: int = 4, N: int = 4):
    """DualPipeV, 2 ranks: stage 0 (rank 0, sends to rank 1) changes its output's shape
    in one micro-batch: every rank must raise PipelineError naming rank 0."""
    from dualpipe import DualPipeV
    mods = ((_NarrowsOnce(0, hidden), _seq_stage(3, hidden)) if rank == 0
            else (_seq_stage(1, hidden), _seq_stage(2, hidden)))
    p = DualPipeV(mods, timeout=20)
    x, l = torch.randn(N * 2, hidden), torch.randn(N * 2, hidden)
    return _outcome(lambda: p.step(x if rank == 0 else None, num_chunks=N,
                                   criterion=Fn.mse_loss, labels=(l if rank == 0 else None,)))
