"""Stage bodies for the pass-through property test, its per-rank worker and its
single-process reference (module level, so spawned rank processes import them).

Every stage takes and returns four tensors ``(x, aux, idx, mask)``: ``x float32[MB, D]``
the activation, ``aux float32[MB, 1]`` a float side tensor, ``idx int64[MB]`` token-like
ids and ``mask bool[MB]``.  The stage computes with each input through ops that *save*
it for backward (an embedding saves the ids, ``where`` the mask, a product both
factors), then returns, per slot, what a *recipe* says:

========  ===========================================================================
slot      recipes
========  ===========================================================================
x         ``fresh`` a new tensor, ``view`` a view of a new tensor, ``identity`` the
          input ``x`` itself, ``detached`` a new tensor detached, ``shared`` a tensor
          that the op computing ``aux`` saved for backward (when ``aux`` is
          ``fresh``; otherwise that op's result is unused and nothing keeps it)
aux       ``fresh``, ``pass`` (the input itself), ``view`` (a view of the input),
          ``detached``
idx       ``pass``, ``new`` (``idx + 1``), ``view`` (``idx[:]``), ``buffer`` (a module
          buffer: a leaf the stage owns)
mask      ``pass``, ``new`` (recomputed from the ids)
========  ===========================================================================

The last stage of a stream always returns fresh ``x`` and ``aux`` so that the loss
needs a gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as Fn

D, MB, V = 8, 2, 11

X_RECIPES = ("fresh", "view", "identity", "detached", "shared")
AUX_RECIPES = ("fresh", "pass", "view", "detached")
IDX_RECIPES = ("pass", "new", "view", "buffer")
MASK_RECIPES = ("pass", "new")
LAST = ("fresh", "fresh", "pass", "pass")


class BodyStage(nn.Module):
    """One stage; ``recipe = (x, aux, idx, mask)`` recipe names (see the module doc)."""

    def __init__(self, stage: int, recipe: tuple[str, str, str, str]):
        super().__init__()
        g = torch.Generator().manual_seed(500 + stage)
        self.lin = nn.Linear(D, D)
        self.emb = nn.Embedding(V, D)
        self.a = nn.Parameter(torch.randn(1, generator=g))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
        self.register_buffer("ids", (torch.arange(MB) * 3 + stage) % V)
        self.recipe = tuple(recipe)
        self.keep: list | None = None

    def forward(self, x, aux, idx, mask):
        rx, raux, ridx, rmask = self.recipe
        h = torch.tanh(self.lin(x)) + self.emb(idx % V)      # saves idx
        h = torch.where(mask[:, None], h, h * 0.5)            # saves mask
        g = h * (aux + self.a)                                # saves h and aux + a
        y = h + g
        if rx == "fresh":
            xo = y
        elif rx == "view":
            xo = y[:, :]
        elif rx == "identity":
            xo = x
        elif rx == "detached":
            xo = y.detach()
        else:  # shared: h is also saved by the product above
            xo = h
        if raux == "fresh":
            auxo = aux * torch.sigmoid(g.sum(-1, keepdim=True) * self.a)
        elif raux == "pass":
            auxo = aux
        elif raux == "view":
            auxo = aux[:, :]
        else:
            auxo = (aux * self.a).detach()
        idxo = {"pass": idx, "new": idx + 1, "view": idx[:]}.get(ridx, self.ids)
        masko = mask if rmask == "pass" else (idx % 2 == 0)
        if self.keep is not None:  # the test looks at them after the step
            self.keep.append((xo, auxo, idxo, masko))
        return xo, auxo, idxo, masko


class HookBodyStage(BodyStage):
    """The same with the published ``overlapped_forward_backward`` hook."""

    @classmethod
    def overlapped_forward_backward(cls, module0, inputs0, criterion0, labels0,
                                    module1, loss1, outputs1, output_grads1):
        from dualpipe.utils import run_backward
        outputs0 = module0(*inputs0)
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
        else:  # outputs1 may be empty: no gradient reached this chunk's outputs
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(x, aux, idx, mask, y):
    return Fn.mse_loss(x, y) + aux.pow(2).mean() * 0.1 + (idx.float().mean()
                                                           + mask.float().mean()) * 0


def make_batch(step: int, n_mb: int):
    g = torch.Generator().manual_seed(70 + step)
    n = n_mb * MB
    x = torch.randn(n, D, generator=g)
    aux = torch.rand(n, 1, generator=g) + 0.5
    idx = torch.randint(0, 100, (n,), generator=g)
    mask = torch.rand(n, generator=g) > 0.3
    y = torch.randn(n, D, generator=g)
    return (x, aux, idx, mask), (y,)


def stage_recipes(case: dict, num_stages: int) -> list[tuple]:
    """The recipe of each stage: the case's ``recipes`` cycled, the last stage's fixed."""
    rs = [tuple(r) for r in case["recipes"]]
    return [rs[s % len(rs)] if s < num_stages - 1 else LAST for s in range(num_stages)]


def _grads(module) -> dict:
    """``{param name: grad or None}`` -- None kept: whether a gradient exists matters."""
    return {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}


def body_cases(rank: int, world: int, cases: list[dict]):
    """Run each case (schedule, transport, recipes, chunks, steps, hook) on these ranks."""
    import warnings

    from dualpipe import DualPipe, DualPipeV, Pipeline
    from dualpipe.schedules import get_schedule
    out = []
    for case in cases:
        name, N = case["schedule"], case["chunks"]
        s = get_schedule(name, world, N)
        nst = 2 * world if name == "dualpipev" else world
        recipes = stage_recipes(case, nst)
        cls = HookBodyStage if case.get("hook") else BodyStage
        mods = [cls(stage, recipes[stage]) for (_st, stage) in s.placement[rank]]
        kw = dict(timeout=60, transport=case.get("transport", "auto"))
        if name == "dualpipe":
            p = DualPipe(mods, **kw)
        elif name == "dualpipev":
            p = DualPipeV(mods, **kw)
        else:
            p = Pipeline(mods[0], schedule=name, **kw)
        res = {"losses": [], "loss_slice": None, "warnings": []}
        for step in range(case.get("steps", 1)):
            xs, ys = make_batch(step, N)
            ins, outs = s.input_microbatches(rank), s.loss_microbatches(rank)
            inputs = () if ins is None else tuple(x[ins.start * MB:ins.stop * MB] for x in xs)
            labels = () if outs is None else tuple(y[outs.start * MB:outs.stop * MB]
                                                   for y in ys)
            res["loss_slice"] = None if outs is None else (outs.start, outs.stop)
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                                 labels=labels)
            res["warnings"] += [str(x.message) for x in w]
            res["losses"].append(loss)
        if case.get("reduce"):  # both DualPipe copies get the stage's whole gradient
            from dualpipe import reduce_dualpipe_grads
            reduce_dualpipe_grads(p)
        res["grads"] = {stage: [_grads(p.module[c])]
                        for c, (_st, stage) in enumerate(s.placement[rank])}
        res["transport"] = p.transport
        out.append(res)
    return out


def reference(case: dict, num_stages: int):
    """Single process: per-step per-micro-batch losses and each stage's gradients (None
    kept) accumulated over the steps, with one thread as the ranks run."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        N = case["chunks"]
        recipes = stage_recipes(case, num_stages)
        stages = [BodyStage(s, recipes[s]) for s in range(num_stages)]
        losses = []
        for step in range(case.get("steps", 1)):
            xs, ys = make_batch(step, N)
            xs_mb = list(zip(*[x.tensor_split(N) for x in xs]))
            ys_mb = list(zip(*[y.tensor_split(N) for y in ys]))
            ls = []
            for i in range(N):
                h = xs_mb[i]
                for st in stages:
                    h = st(*h)
                loss = criterion(*h, *ys_mb[i])
                loss.backward()
                ls.append(loss.detach())
            losses.append(torch.stack(ls))
        return losses, {s: _grads(st) for s, st in enumerate(stages)}
    finally:
        torch.set_num_threads(threads)


def sum_copies(per_rank: list[dict]) -> dict:
    """``{stage: {param: grad or None}}`` summed over every copy on every rank (a
    DualPipe stage lives on two ranks); None only when every copy has None."""
    total: dict = {}
    for grads in per_rank:
        for stage, copies in grads.items():
            for g in copies:
                acc = total.setdefault(stage, {})
                for n, t in g.items():
                    have = acc.get(n)
                    acc[n] = t if have is None else (have if t is None else have + t)
    return total


def released_outputs(rank: int, world: int, recipes: list[tuple]):
    """DualPipeV on 2 ranks, stage 0 (rank 0, sends to rank 1) with each recipe: which of
    its returned tensors had their data released once sent (numel 0 after the step),
    per slot, over all micro-batches; and the losses, to show the step was right."""
    from dualpipe import DualPipeV
    out = []
    for rec in recipes:
        case = {"recipes": [rec], "chunks": 4}
        rs = stage_recipes(case, 2 * world)
        mods = [BodyStage(rank, rs[rank]), BodyStage(2 * world - 1 - rank, rs[-1 - rank])]
        mods[0].keep = []
        p = DualPipeV(mods, timeout=60)
        xs, ys = make_batch(0, 4)
        loss, _ = p.step(*(xs if rank == 0 else ()), num_chunks=4,
                         criterion=criterion if rank == 0 else None,
                         labels=ys if rank == 0 else ())
        kept = mods[0].keep
        out.append({"released": [all(o[i].numel() == 0 for o in kept) for i in range(4)],
                    "kept": [all(o[i].numel() > 0 for o in kept) for i in range(4)],
                    "loss": loss})
    return out
