"""Rank functions for tests/test_training.py (module level: spawned ranks import them)."""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from tests.models import MB, D, criterion, make_batch
from tests.workers import build, rank_io


def _outcome(fn):
    try:
        fn()
        return "ok"
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"


def _stage_grads(p, s, rank):
    out = {}
    for c, (_st, stage) in enumerate(s.placement[rank]):
        out.setdefault(stage, []).append({n: q.grad.clone() for n, q in
                                          p.module[c].named_parameters() if q.grad is not None})
    return out


def clip_norms(rank: int, world: int, name: str, N: int):
    """step, reduce, then three clips (inf and 1 with no clipping, 2 with clipping);
    before that, every misuse that must raise on every rank."""
    from dualpipe import clip_grad_norm_, reduce_dualpipe_grads
    p, s = build(name, rank, world, N, timeout=60)
    errors = {"clip before step": _outcome(lambda: clip_grad_norm_(p, 1.0))}
    xs, ys = make_batch(0, N, False)
    inputs, labels, _ = rank_io(s, rank, xs, ys)
    p.step(*inputs, num_chunks=N, criterion=criterion if labels else None, labels=labels)
    if name == "dualpipe":
        errors["clip before reduce"] = _outcome(lambda: clip_grad_norm_(p, 1.0))
    errors["bad max_norm"] = _outcome(lambda: clip_grad_norm_(p, 0.0))
    reduce_dualpipe_grads(p)
    if name == "dualpipe":
        errors["reduce twice"] = _outcome(lambda: reduce_dualpipe_grads(p))
    norms = [clip_grad_norm_(p, 1e9, math.inf), clip_grad_norm_(p, 1e9, 1.0),
             clip_grad_norm_(p, 0.05)]
    return {"errors": errors, "norms": norms, "grads": _stage_grads(p, s, rank)}


def dp_pp(rank: int, world: int, name: str, dp: int, N: int):
    """dp replicas of a pipeline of world/dp ranks; replica d trains on its own
    batch (step d of tests.models.make_batch); gradients averaged over the replicas
    twice from the same step: ``reduce_dualpipe_grads`` + ``all_reduce_grads``
    (``"grads_two_calls"``), then ``sync_grads`` (``"grads_sync"``; ``"grads"``: clipped)."""
    from dualpipe import all_reduce_grads, clip_grad_norm_, reduce_dualpipe_grads, sync_grads
    pp = world // dp
    d, r = divmod(rank, pp)
    pp_groups = [dist.new_group(list(range(k * pp, (k + 1) * pp))) for k in range(dp)]
    dp_groups = [dist.new_group(list(range(j, world, pp))) for j in range(pp)]
    p, s = build(name, r, pp, N, timeout=60, process_group=pp_groups[d])
    errors = {"all_reduce before step": _outcome(lambda: all_reduce_grads(p, dp_groups[r])),
              "sync before step": _outcome(lambda: sync_grads(p, dp_groups[r])),
              "sync with a bad group": _outcome(lambda: sync_grads(p, "dp"))}
    xs, ys = make_batch(d, N, False)
    inputs, labels, loss_slice = rank_io(s, r, xs, ys)
    out = {}
    for how in ("two calls", "sync_grads"):  # the same step twice: deterministic on CPU
        p.zero_grad(set_to_none=True)
        loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                         labels=labels)
        if how == "two calls":
            reduce_dualpipe_grads(p)
            all_reduce_grads(p, dp_groups[r])
            out["grads_two_calls"] = _stage_grads(p, s, r)
        else:
            sync_grads(p, dp_groups[r])
            out["grads_sync"] = _stage_grads(p, s, r)
            errors["reduce after sync"] = _outcome(lambda: reduce_dualpipe_grads(p))
    norm = clip_grad_norm_(p, 0.05)
    return {"replica": d, "pp_rank": r, "loss": loss, "loss_slice": loss_slice, "norm": norm,
            "errors": errors, "grads": _stage_grads(p, s, r), **out}


def _train_steps(p, s, rank, opt, N, steps):
    from dualpipe import reduce_dualpipe_grads
    losses = []
    for step in steps:
        xs, ys = make_batch(step, N, False)
        inputs, labels, _ = rank_io(s, rank, xs, ys)
        loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                         labels=labels)
        reduce_dualpipe_grads(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss)
    return losses


def _weights(p, s, rank):
    return {stage: {n: q.detach().clone() for n, q in p.module[c].state_dict().items()}
            for c, (_st, stage) in enumerate(s.placement[rank])}


def checkpoint_round(rank: int, world: int, name: str, N: int, path: str, mode: str):
    """mode "save": 2 steps, save, 2 more steps (the uninterrupted run).  mode "load":
    differently initialised stages and a fresh optimizer, load, the same 2 more steps.
    mode "wrong": load a checkpoint of another stage count, then show the pipe works."""
    from dualpipe import DualPipe, DualPipeV, Pipeline, checkpoint
    from dualpipe.schedules import get_schedule
    from tests.models import Stage
    s = get_schedule(name, world, N)
    shift = 0 if mode == "save" else 50
    mods = [Stage(stage + shift) for (_st, stage) in s.placement[rank]]
    cls = {"dualpipe": DualPipe, "dualpipev": DualPipeV}.get(name)
    p = cls(mods, timeout=60) if cls else Pipeline(mods[0], schedule=name, timeout=60)
    opt = torch.optim.Adam(p.parameters(), lr=0.01 if mode == "save" else 0.5, betas=(0.8, 0.95))
    out = {"loss_slice": rank_io(s, rank, *make_batch(0, N, False))[2]}
    if mode == "save":
        _train_steps(p, s, rank, opt, N, [0, 1])
        checkpoint.save(p, path, opt)
        out["saved"] = _weights(p, s, rank)
        out["losses"] = _train_steps(p, s, rank, opt, N, [2, 3])
    elif mode == "load":
        checkpoint.load(p, path, opt)
        out["loaded"] = _weights(p, s, rank)
        out["lr"] = [g["lr"] for g in opt.param_groups]
        out["losses"] = _train_steps(p, s, rank, opt, N, [2, 3])
    else:
        if mode == "one_bad" and rank == 1:  # this rank's stage has no l1 bias
            import torch.nn as nn
            p.module[0].l1 = nn.Linear(8, 8, bias=False)
            opt = torch.optim.Adam(p.parameters(), lr=0.5)
        out["error"] = _outcome(lambda: checkpoint.load(p, path, opt))
        if mode == "wrong":
            out["after"] = _train_steps(p, s, rank, opt, N, [0])
    return out


def fsdp_pp(rank: int, world: int, name: str, N: int, split: bool = False):
    """2 (data, FSDP2-sharded) x world/2 (pipeline): each stage module fully_shard'ed over
    the data-parallel ranks; replica d trains on its own batch; returns the full
    gradients (gathered from the shards) and the clipped norm."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dualpipe import DualPipe, DualPipeV, clip_grad_norm_, reduce_dualpipe_grads
    from dualpipe.schedules import get_schedule
    from tests.models import Stage
    pp = world // 2
    mesh = init_device_mesh("cpu", (2, pp), mesh_dim_names=("dp", "pp"))
    d, r = mesh.get_local_rank("dp"), mesh.get_local_rank("pp")
    s = get_schedule(name, pp, N)
    mods = []
    for _st, stage in s.placement[r]:
        m = Stage(stage)
        fully_shard(m, mesh=mesh["dp"])
        mods.append(m)
    cls = DualPipe if name == "dualpipe" else DualPipeV
    try:
        p = cls(mods, process_group=mesh.get_group("pp"), timeout=60,
                split_linear_weight_grads=split)
    except Exception as e:  # noqa: BLE001 - the refusal is what the test checks
        return {"error": f"{type(e).__name__}: {e}"}
    xs, ys = make_batch(d, N, False)
    inputs, labels, loss_slice = rank_io(s, r, xs, ys)
    loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                     labels=labels)
    reduce_dualpipe_grads(p)
    norm = clip_grad_norm_(p, 0.05)
    grads = {}
    for c, (_st, stage) in enumerate(s.placement[r]):
        grads.setdefault(stage, []).append({n: q.grad.full_tensor() for n, q in
                                            p.module[c].named_parameters()})
    return {"replica": d, "loss": loss, "loss_slice": loss_slice, "norm": norm, "grads": grads}


def fsdp_wgs(rank: int, world: int, N: int):
    """DualPipeV over 2 FSDP2 replicas with stages whose Linear layers defer their weight
    gradients through WeightGradStore: the runtime must run their backwards whole."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dualpipe import DualPipeV
    from dualpipe.schedules import get_schedule
    from tests.compose_models import MB as CMB
    from tests.compose_models import ComposeStage, batch
    from tests.compose_models import criterion as ccrit
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "pp"))
    d, r = mesh.get_local_rank("dp"), mesh.get_local_rank("pp")
    s = get_schedule("dualpipev", world // 2, N)
    mods = []
    for _st, stage in s.placement[r]:
        m = ComposeStage(stage, linear="wgs")
        fully_shard(m, mesh=mesh["dp"])
        mods.append(m)
    p = DualPipeV(mods, process_group=mesh.get_group("pp"), timeout=60)
    x, y = batch(d, N, {})
    p.step(*((x,) if r == 0 else ()), num_chunks=N, criterion=ccrit if r == 0 else None,
           labels=(y,) if r == 0 else ())
    assert CMB  # same micro-batch size as the reference
    return {"replica": d, "grads": {stage: [{n: q.grad.full_tensor() for n, q in
                                             p.module[c].named_parameters()}]
                                    for c, (_st, stage) in enumerate(s.placement[r])}}


def ddp_stage_refused(rank: int, world: int):
    from torch.nn.parallel import DistributedDataParallel

    from dualpipe import DualPipeV
    from tests.models import Stage
    mods = [DistributedDataParallel(Stage(0)), Stage(1)]
    return _outcome(lambda: DualPipeV(mods, timeout=30))


def fsdp_checkpoint(rank: int, world: int, path: str, mode: str):
    """DualPipeV over 2 FSDP2 replicas: "save" trains 2 steps, saves (every rank, over
    the world), trains 2 more; "load" starts from other weights and a fresh optimizer,
    loads, trains the same 2 steps.  Same layout: the losses must be bitwise equal."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dualpipe import DualPipeV, checkpoint, clip_grad_norm_
    from dualpipe.schedules import get_schedule
    from tests.models import Stage
    N = 4
    mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("dp", "pp"))
    d, r = mesh.get_local_rank("dp"), mesh.get_local_rank("pp")
    s = get_schedule("dualpipev", world // 2, N)
    mods = []
    for _st, stage in s.placement[r]:
        m = Stage(stage + (0 if mode == "save" else 50))
        fully_shard(m, mesh=mesh["dp"])
        mods.append(m)
    p = DualPipeV(mods, process_group=mesh.get_group("pp"), timeout=60)
    opt = torch.optim.Adam(p.parameters(), lr=0.01 if mode == "save" else 0.5)
    out = {"error": _outcome(lambda: checkpoint.save(p, path + "-refused"))}

    def steps(ids):
        got = []
        for step in ids:
            xs, ys = make_batch(10 * d + step, N, False)
            inputs, labels, _ = rank_io(s, r, xs, ys)
            loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                             labels=labels)
            clip_grad_norm_(p, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            got.append(loss)
        return got

    if mode == "save":
        steps([0, 1])
        checkpoint.save(p, path, opt, process_group=dist.group.WORLD)
    else:
        checkpoint.load(p, path, opt, process_group=dist.group.WORLD)
    out["losses"] = steps([2, 3])
    return out


class SometimesStage(nn.Module):
    """A stage whose parameter ``extra`` only micro-batches whose first entry is positive
    use and whose ``never`` none does: gradients on some copies or replicas only."""

    def __init__(self, stage: int):
        super().__init__()
        from tests.models import Stage
        self.body = Stage(stage)
        self.extra = nn.Parameter(torch.full((D,), 0.5))
        self.never = nn.Parameter(torch.zeros(D))

    def forward(self, x):
        y = self.body(x)
        return y + x * self.extra if float(x[0, 0]) > 0 else y


def sync_none_grads(rank: int, world: int, dp: int, N: int):
    """DualPipe on world/dp ranks x dp replicas with SometimesStage stages; the same
    step synchronised four times: reduce_dualpipe_grads + all_reduce_grads, then
    sync_grads, averaged and summed (``average=False``); returns each way's gradients ({stage: [{name: grad}]}, None left out) and which
    copies had an ``extra`` gradient before synchronising."""
    from dualpipe import DualPipe, all_reduce_grads, reduce_dualpipe_grads, sync_grads
    from dualpipe.schedules import get_schedule
    pp = world // dp
    d, r = divmod(rank, pp)
    pp_groups = [dist.new_group(list(range(k * pp, (k + 1) * pp))) for k in range(dp)]
    dp_groups = [dist.new_group(list(range(j, world, pp))) for j in range(pp)]
    s = get_schedule("dualpipe", pp, N)
    p = DualPipe([SometimesStage(stage) for _st, stage in s.placement[r]], timeout=60,
                 process_group=pp_groups[d])
    xs, ys = make_batch(d, N, False)
    inputs, labels, _ = rank_io(s, r, xs, ys)
    out = {}
    for how in ("two calls", "sync_grads", "two calls summed", "sync_grads summed"):
        average = not how.endswith("summed")
        p.zero_grad(set_to_none=True)
        p.step(*inputs, num_chunks=N, criterion=criterion if labels else None, labels=labels)
        out["extra_before"] = [m.extra.grad is not None for m in p.module]
        if how.startswith("two calls"):
            reduce_dualpipe_grads(p)
            all_reduce_grads(p, dp_groups[r], average=average)
        else:
            sync_grads(p, dp_groups[r], average=average)
        out[how] = _stage_grads(p, s, r)
    p.close()
    return {"replica": d, **out}
