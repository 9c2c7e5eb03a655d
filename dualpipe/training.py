"""What a training loop puts around a pipeline: gradient reduction, clipping, data parallel.

Per step, on every rank of the pipeline::

    loss, _ = pipe.step(*inputs, num_chunks=N, criterion=crit, labels=labels)
    dualpipe.sync_grads(pipe, dp_group)               # DualPipe's copies + data parallel
    norm = dualpipe.clip_grad_norm_(pipe, max_norm)   # the whole model's norm, every rank
    optimizer.step(); optimizer.zero_grad()

:func:`sync_grads` is :func:`reduce_dualpipe_grads` (add the two copies of a DualPipe
stage) and :func:`all_reduce_grads` (average over the data-parallel replicas) in one
call, moving fewer bytes than the two in a row when both have work (DualPipe with data
parallelism); either may also be called alone.

Every function here is collective over the pipeline (and, where one is passed, the data
parallel group): call it on every rank, in the same order.  Waits on other pipeline ranks
use the pipeline's own transport and its ``timeout``, and a failure there stops every
rank as a failure in ``step()`` does.

Stage facts come from the schedule: :func:`local_stages` says which stage each of this
rank's modules is and whether it is the stage's primary copy (DualPipe holds every stage
on two ranks; each is counted once).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from .runtime import PipelineRuntime
from .schedules import placement_schedule

__all__ = ["LocalStage", "local_stages", "clip_grad_norm_", "all_reduce_grads",
           "reduce_dualpipe_grads", "sync_grads"]


class LocalStage(NamedTuple):
    """One of this rank's stage modules: ``pipe.module[chunk]`` is stage ``stage``;
    ``primary`` is False for the second copy of a stage another rank also holds."""

    chunk: int
    stage: int
    primary: bool


def local_stages(pipe: PipelineRuntime) -> list[LocalStage]:
    """This rank's stages in chunk order (from the schedule's placement, which does not
    depend on the number of micro-batches)."""
    _check_pipe(pipe, "local_stages")
    s = placement_schedule(pipe.schedule_name, pipe.num_ranks)
    return [LocalStage(c, stage, s.primary[pipe.rank][c])
            for c, (_stream, stage) in enumerate(s.placement[pipe.rank])]


def num_stages(pipe: PipelineRuntime) -> int:
    """Distinct stages of the whole pipeline (DualPipe: ``P``; DualPipeV: ``2R``)."""
    return placement_schedule(pipe.schedule_name, pipe.num_ranks).num_stages


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.4: the private home
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local part of a DTensor (an FSDP2 shard), else ``t``."""
    cls = _dtensor_cls()
    return t.to_local() if cls is not None and isinstance(t, cls) else t


def _check_pipe(pipe, what: str) -> None:
    if not isinstance(pipe, PipelineRuntime):
        raise TypeError(f"{what} takes the pipeline (DualPipe, DualPipeV or Pipeline), got "
                        f"{type(pipe).__name__}")


def _check_not_summed(pipe: PipelineRuntime, what: str) -> None:
    if getattr(pipe, "_reduced_at_step", None) == pipe.steps_done and pipe.stopped is None:
        raise RuntimeError(f"{what}: DualPipe's copies were already summed after this step "
                           "(reduce_dualpipe_grads or sync_grads was called); summing again "
                           "would add the partner rank's gradients twice: call one of them "
                           "once per step")


def _check_stepped(pipe: PipelineRuntime, what: str) -> None:
    if pipe.steps_done == 0:
        raise RuntimeError(f"{what} before any step(): there are no gradients yet; call it "
                           "after pipe.step(...) and before optimizer.step()")


def reduce_dualpipe_grads(pipe: PipelineRuntime) -> None:
    """Make both copies of every DualPipe stage hold the stage's full gradient.

    In DualPipe stage ``s`` lives on rank ``s`` (chunk 0, forward direction) and on
    rank ``P-1-s`` (chunk 1, reverse direction); each copy accumulates the gradient of
    the micro-batches it ran.  Call this on every rank after ``step()`` (after the last
    one, when accumulating over several) and before the optimizer step: each rank swaps
    its two chunks' gradients with its partner rank and adds, so both copies get
    ``g_forward + g_reverse`` (bitwise equal on both sides; floating-point addition is
    commutative) and stay identical after identical optimizer updates.  A parameter
    without a gradient on both copies keeps ``None``.  A no-op for schedules without
    duplicated stages.  Calling it twice for one step would add the partner's share
    twice: that raises ``RuntimeError``.
    """
    _check_pipe(pipe, "reduce_dualpipe_grads")
    sched = placement_schedule(pipe.schedule_name, pipe.num_ranks)
    if not sched.duplicated_stages:
        return
    _check_stepped(pipe, "reduce_dualpipe_grads")
    _check_not_summed(pipe, "reduce_dualpipe_grads")
    copies: dict[int, list[tuple[int, int]]] = {}
    for r, chunks in enumerate(sched.placement):
        for c, (_stream, stage) in enumerate(chunks):
            copies.setdefault(stage, []).append((r, c))
    # (stage, my chunk, the rank holding the stage's other copy), in stage order on both
    # sides of every exchange, so sends and receives pair up
    pairs = []
    for c, (_stream, stage) in enumerate(sched.placement[pipe.rank]):
        others = [rc for rc in copies[stage] if rc != (pipe.rank, c)]
        if len(others) > 1:
            raise ValueError(f"stage {stage} has {len(others) + 1} copies; the gradient "
                             "reduction handles two")
        if others:
            pairs.append((stage, c, others[0][0]))
    pairs.sort()
    mine, theirs, have, have_theirs = {}, {}, {}, {}
    for _stage, c, _peer in pairs:
        # FSDP2-sharded stages: the other copy holds the same shard of the same stage
        mine[c], have[c] = _flat_grads(list(pipe.module[c].parameters()), pipe.device)
        theirs[c], have_theirs[c] = torch.empty_like(mine[c]), torch.empty_like(have[c])

    def swap(p2p):
        what = "gradients of the duplicated stages"
        handles = []
        for peer in sorted({peer for _s, _c, peer in pairs}):
            cs = [c for _s, c, p in pairs if p == peer]
            g = pipe.to_group[peer]
            handles.append(p2p.irecv([theirs[c] for c in cs] + [have_theirs[c] for c in cs],
                                     g, what, tag=4))
            handles.append(p2p.isend([mine[c] for c in cs] + [have[c] for c in cs], g, what,
                                     tag=4))
        for h in handles:
            h.wait(pipe.timeout)

    pipe.exchange("reduce_dualpipe_grads", swap)
    for _stage, c, _peer in pairs:
        # no copy has a gradient: None, as in a single process
        _set_grads(list(pipe.module[c].parameters()), mine[c] + theirs[c],
                   (have[c] | have_theirs[c]).tolist())
    pipe._reduced_at_step = pipe.steps_done


def _grads(pipe: PipelineRuntime, primary_only: bool) -> list[torch.Tensor]:
    out = []
    for st in local_stages(pipe):
        if primary_only and not st.primary:
            continue
        out += [p.grad for p in pipe.module[st.chunk].parameters() if p.grad is not None]
    return out


def clip_grad_norm_(pipe: PipelineRuntime, max_norm: float, norm_type: float = 2.0, *,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """Clip the gradients of the whole pipelined model to a global norm; return the norm.

    The norm is over every stage of the model, each counted once (a DualPipe stage's
    two copies hold the same gradient after :func:`reduce_dualpipe_grads`, which must
    come first), so it equals ``torch.nn.utils.clip_grad_norm_`` on the single-process
    model up to floating-point rounding (here the per-rank partial sums are added in
    float64).  All of this rank's gradients (both copies) are scaled by
    ``min(1, max_norm / (norm + 1e-6))``, as torch does.

    With data parallelism, average the gradients first (:func:`all_reduce_grads`): the
    replicas then hold the same gradients and compute the same norm, so no data-parallel
    group is involved here.

    Args:
        pipe: the pipeline, after ``step()`` (and :func:`reduce_dualpipe_grads` for
            DualPipe).
        max_norm: the largest norm allowed, > 0.
        norm_type: the p of the p-norm (> 0), or ``math.inf``.
        error_if_nonfinite: raise ``RuntimeError`` (on every rank) when the norm is NaN
            or infinite instead of scaling by it.
    Returns:
        the total norm before clipping, a float32 scalar tensor on the stages' device,
        equal on every rank.
    """
    _check_pipe(pipe, "clip_grad_norm_")
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 or math.inf, got {norm_type}")
    _check_stepped(pipe, "clip_grad_norm_")
    if placement_schedule(pipe.schedule_name, pipe.num_ranks).duplicated_stages and \
            getattr(pipe, "_reduced_at_step", None) != \
            pipe.steps_done:
        raise RuntimeError("DualPipe: call dualpipe.sync_grads(pipe, dp_group) (or "
                           "dualpipe.reduce_dualpipe_grads(pipe)) before clip_grad_norm_, so "
                           "each stage's gradient is whole (its two copies each hold part "
                           "of it after step())")
    inf = math.isinf(norm_type)

    def part(gs) -> torch.Tensor:
        acc = torch.zeros(1, dtype=torch.float64, device=pipe.device)
        for g in gs:
            g64 = g.detach().to(torch.float64).abs()
            if g64.numel():
                acc = torch.maximum(acc, g64.max().reshape(1)) if inf else \
                    acc + g64.pow(norm_type).sum().reshape(1)
        return acc

    # plain gradients count as they are; shards of FSDP2 (DTensor) gradients are
    # combined over their mesh first (each data-parallel rank holds one shard)
    plain, sharded = [], {}
    cls = _dtensor_cls()
    for g in _grads(pipe, primary_only=True):
        if cls is not None and isinstance(g, cls):
            if not all(pl.is_shard() for pl in g.placements):
                raise ValueError("clip_grad_norm_ handles gradients sharded over their mesh "
                                 f"(FSDP2's Shard placements), got {g.placements}")
            sharded.setdefault(g.device_mesh, []).append(g.to_local())
        else:
            plain.append(g)
    local = part(plain)
    for mesh, gs in sharded.items():
        s = part(gs)
        dist.all_reduce(s, op=dist.ReduceOp.MAX if inf else dist.ReduceOp.SUM,
                        group=mesh.get_group())
        local = torch.maximum(local, s) if inf else local + s
    parts = pipe.exchange("clip_grad_norm_", lambda p2p: p2p.all_gather(
        local, pipe.num_ranks, "gradient norms").wait(pipe.timeout))
    stacked = torch.cat([t.reshape(1) for t in parts])
    total64 = stacked.max() if inf else stacked.sum().pow(1.0 / norm_type)
    total = total64.to(torch.float32)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"the total gradient norm (order {norm_type}) is non-finite "
                           f"({total.item()}); pass error_if_nonfinite=False to scale anyway")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in _grads(pipe, primary_only=False):
        _local(g).detach().mul_(coef.to(g.dtype))
    return total


def all_reduce_grads(pipe: PipelineRuntime, group: dist.ProcessGroup, *,
                     average: bool = True) -> None:
    """Data parallel: all-reduce this rank's stage gradients over ``group``.

    ``group`` holds the ranks that run the same pipeline rank on different data (for a
    ``DeviceMesh``, ``mesh.get_group("dp")``).  Every one of them must call this, after
    ``step()`` (and :func:`reduce_dualpipe_grads`, in either order), before clipping and
    the optimizer step; gradients are flattened into one buffer per dtype and reduced
    with one collective each, then averaged (``average=True``) or summed.  A parameter
    without a gradient on every replica keeps ``None``; one with a gradient on some
    replicas is reduced with zeros for the others.

    The collective runs on ``group`` and waits as long as that group's own timeout
    (``init_process_group(timeout=...)`` / ``new_group(timeout=...)``).

    Stage modules wrapped in ``DistributedDataParallel`` are refused at pipeline
    construction: DDP reduces inside every backward, which the pipeline runs once per
    micro-batch (and splits into input- and weight-gradient parts).
    """
    _check_dp_group(pipe, group, "all_reduce_grads")
    _check_stepped(pipe, "all_reduce_grads")
    _all_reduce_params(pipe, _params_by_stage(pipe), group, average, "all_reduce_grads")


def _check_dp_group(pipe: PipelineRuntime, group, what: str) -> None:
    _check_pipe(pipe, what)
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{what} needs the data-parallel ProcessGroup, got "
                        f"{type(group).__name__}")


def _params_by_stage(pipe: PipelineRuntime) -> list[torch.nn.Parameter]:
    """This rank's parameters in stage order (not chunk order): the two ranks holding
    DualPipe's copies of a pair of stages lay them out alike, so where the backend
    reduces alike for alike buffers (gloo's ring: its order depends on where an element
    sits in the buffer) both ranks' all-reduces give the copies the same bits.  Two NCCL
    communicators over different GPUs may still pick different algorithms; only
    :func:`sync_grads` copies one copy into the other."""
    return [p for st in sorted(local_stages(pipe), key=lambda st: st.stage)
            for p in pipe.module[st.chunk].parameters()]


def _all_reduce_params(pipe: PipelineRuntime, params: list, group: dist.ProcessGroup,
                       average: bool, what: str) -> None:
    """All-reduce the gradients of ``params`` over ``group``: which exist first (a
    parameter with a gradient on some replica gets zeros on the others; with none it
    keeps ``None``), then one flat buffer per dtype; averaged on the way back."""
    _refuse_sharded(params, what, "; do not all-reduce them again")
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32,
                       device=pipe.device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
    for p, h in zip(params, has.tolist()):
        if h:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
    n = group.size()
    for ps in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        off = 0
        for p in ps:
            k = p.numel()
            part = flat[off: off + k].view_as(p)
            if average:  # averaged on the way back: one pass over the bytes, not two
                torch.div(part, n, out=p.grad)
            else:
                p.grad.copy_(part)
            off += k


def _refuse_sharded(params: list, what: str, advice: str) -> None:
    """FSDP2-sharded stages (DTensor parameters) need no all-reduce: refuse them."""
    cls = _dtensor_cls()
    if cls is not None and any(isinstance(p, cls) for p in params):
        raise ValueError(f"{what}: these stages are sharded (DTensor parameters, e.g. "
                         "FSDP2's fully_shard), whose backward already reduce-scatters the "
                         f"gradients over the data-parallel ranks{advice}")


def _flat_grads(params: list, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``params``' gradients in one buffer (zeros where ``None``) and which of them exist
    (uint8); FSDP2-sharded parameters by their local shard."""
    grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p))
             for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads]) if grads else \
        torch.zeros(0, device=device)
    have = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8,
                        device=device)
    return flat, have


def _set_grads(params: list, flat: torch.Tensor, have) -> None:
    """``params``' gradients from ``flat`` where ``have`` says one exists, else ``None``."""
    off = 0
    for p, h in zip(params, have):
        n = _local(p).numel()
        if not h:
            p.grad = None
        else:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = _local(p.grad)
            g.copy_(flat[off: off + n].view_as(g))
        off += n


def partner_rank(sched, rank: int) -> int:
    """The pipeline rank holding the primary copy of the stage whose second copy
    ``rank`` holds (DualPipe: ``P - 1 - rank``), from the schedule's placement: where
    :func:`sync_grads` exchanges that stage's gradients (every rank of a DualPipe
    pipeline holds one primary and one second copy)."""
    second = next(stage for (_s, stage), prim in zip(sched.placement[rank],
                                                     sched.primary[rank]) if not prim)
    return next(r for r, chunks in enumerate(sched.placement)
                for c, (_s, stage) in enumerate(chunks)
                if stage == second and sched.primary[r][c])


def sync_grads(pipe: PipelineRuntime, dp_group: dist.ProcessGroup | None = None, *,
               average: bool = True) -> None:
    """Everything the gradients need after ``step()``, before clipping and the optimizer:
    :func:`reduce_dualpipe_grads` (DualPipe: both copies of a stage get the sum of the
    two) and, with ``dp_group``, :func:`all_reduce_grads` (averaged, or summed with
    ``average=False``, over the data-parallel replicas), in fewer bytes than those two
    in a row where both have work.

    DualPipe with data parallelism: the two in a row swap both of a rank's stage modules
    with the partner rank holding their other copies, then all-reduce both copies of
    every stage over the replicas.  Here each rank sends its second copy to the rank
    holding that stage's primary copy and takes the partner's second copy of its own
    primary stage (one module each way), all-reduces its primary stage alone over
    ``dp_group``, and sends the result back into the partner's second copy (one module
    each way): the same bytes over the pipeline's link (in two exchanges, so one more
    latency), **half** the bytes over the data-parallel all-reduce.  Both copies end
    bitwise equal on any backend (the second is a copy of the first); the values are
    those of the two calls in a row, bit for bit with ``DP = 2`` (with more replicas an
    all-reduce of another buffer may sum in another order: equal within rounding).

    Without duplicated stages, without ``dp_group``, or with a ``dp_group`` of one rank
    it runs the two functions.  Call it on every rank of every replica, once per step;
    after it, :func:`reduce_dualpipe_grads` for the same step raises (the copies are
    summed).  FSDP2-sharded stages: pass no ``dp_group`` (their backward reduce-scatters
    over the replicas; :func:`all_reduce_grads` refuses them).
    """
    what = "sync_grads"
    if dp_group is None:
        _check_pipe(pipe, what)
    else:
        _check_dp_group(pipe, dp_group, what)
    _check_stepped(pipe, what)
    sched = placement_schedule(pipe.schedule_name, pipe.num_ranks)
    if sched.duplicated_stages:
        _check_not_summed(pipe, what)
    if dp_group is None or dp_group.size() == 1 or not sched.duplicated_stages:
        reduce_dualpipe_grads(pipe)  # a no-op without duplicated stages
        if dp_group is not None:
            all_reduce_grads(pipe, dp_group, average=average)
        return
    stages = local_stages(pipe)
    prim = [st for st in stages if st.primary]
    sec = [st for st in stages if not st.primary]
    if len(prim) != 1 or len(sec) != 1:
        raise ValueError(f"sync_grads expects one primary and one second copy per rank "
                         f"(DualPipe), got {stages}")
    prim, sec = prim[0], sec[0]
    partner = partner_rank(sched, pipe.rank)
    mine_p = list(pipe.module[prim.chunk].parameters())
    mine_s = list(pipe.module[sec.chunk].parameters())
    _refuse_sharded(mine_p + mine_s, what, ": call sync_grads(pipe) without dp_group (or "
                    "reduce_dualpipe_grads)")
    peer = pipe.to_group[partner]
    label = "gradients of the duplicated stages"

    def swap(send: list, recv: list):
        def run(p2p):
            handles = [p2p.irecv(recv, peer, label, tag=4), p2p.isend(send, peer, label, tag=4)]
            for h in handles:
                h.wait(pipe.timeout)
        pipe.exchange(what, run)

    # 1. my second copy goes to the stage's primary; the partner's second copy of my
    #    primary stage comes here and is added (as reduce_dualpipe_grads adds)
    flat_s, have_s = _flat_grads(mine_s, pipe.device)
    flat_p, have_p = _flat_grads(mine_p, pipe.device)
    theirs, theirs_have = torch.empty_like(flat_p), torch.empty_like(have_p)
    swap([flat_s, have_s], [theirs, theirs_have])
    _set_grads(mine_p, flat_p + theirs, (have_p | theirs_have).tolist())
    pipe._reduced_at_step = pipe.steps_done  # summed: a retry must not add them again
    # 2. the primary stage alone over the replicas
    _all_reduce_params(pipe, mine_p, dp_group, average, what)
    # 3. the result back into the partner's second copy (mine from the partner)
    flat_p, have_p = _flat_grads(mine_p, pipe.device)
    back, back_have = torch.empty_like(flat_s), torch.empty_like(have_s)
    swap([flat_p, have_p], [back, back_have])
    _set_grads(mine_s, back, back_have.tolist())
