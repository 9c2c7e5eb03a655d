"""Per-rank functions for the misuse and failure tests."""
from __future__ import annotations

import datetime
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn as nn

from tests.models import MB, D, Stage, criterion, make_batch
from tests.workers import build, rank_io


def _step(p, s, rank, N, **kw):
    xs, ys = make_batch(0, N, False)
    inputs, labels, _ = rank_io(s, rank, xs, ys)
    args = dict(num_chunks=N, criterion=criterion if labels else None, labels=labels)
    args.update(kw)
    return p.step(*inputs, **args)


def _outcome(fn):
    t = time.monotonic()
    try:
        fn()
        return ("ok", "", time.monotonic() - t)
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e), time.monotonic() - t)


def misuse(rank: int, world: int):
    """Each case must raise on every rank (or warn) and leave the group usable."""
    from dualpipe import DualPipe
    out = {}
    p, s = build("dualpipe", rank, world, 4, timeout=20)
    out["bad_chunks"] = _outcome(lambda: _step(p, s, rank, 4, num_chunks=5))
    out["diff_chunks"] = _outcome(lambda: _step(p, s, rank, 4, num_chunks=4 if rank else 8))
    xs, ys = make_batch(0, 4, False)
    _, labels0, _ = rank_io(s, rank, xs, ys)
    out["no_inputs"] = _outcome(  # rank 0 forgets its inputs, rank 1 is right
        (lambda: p.step(num_chunks=4, criterion=criterion, labels=labels0)) if rank == 0
        else (lambda: _step(p, s, rank, 4)))
    out["no_criterion"] = _outcome(lambda: _step(p, s, rank, 4, criterion=None))
    xs, ys = make_batch(0, 4, False)
    inputs, labels, _ = rank_io(s, rank, xs, ys)
    out["indivisible"] = _outcome(lambda: p.step(inputs[0][:3], num_chunks=4,
                                                 criterion=criterion, labels=(labels[0][:3],)))
    out["wrong_device"] = _outcome(lambda: p.step(inputs[0].to("meta"), num_chunks=4,
                                                  criterion=criterion, labels=labels))

    def mixed_mode():
        with torch.set_grad_enabled(rank != 0):
            _step(p, s, rank, 4)
    out["mixed_grad_mode"] = _outcome(mixed_mode)
    out["diff_return_outputs"] = _outcome(lambda: _step(p, s, rank, 4, return_outputs=rank == 0))
    # an empty batch (every rank; one rank), too few labels (rank 0's labels belong to
    # rank 1's inputs: 2 labels for 4 samples, each micro-batch's 1 label would broadcast)
    out["empty"] = _outcome(lambda: p.step(inputs[0][:0], num_chunks=4, criterion=criterion,
                                           labels=(labels[0][:0],)))
    out["empty_one"] = _outcome(lambda: p.step(inputs[0][:0] if rank == 0 else inputs[0],
                                               num_chunks=4, criterion=criterion,
                                               labels=labels))
    out["few_labels"] = _outcome(lambda: p.step(
        inputs[0], num_chunks=4, criterion=criterion,
        labels=(labels[0][:2],) if rank == 0 else labels))
    out["mixed_sizes"] = _outcome(lambda: p.step(
        inputs[0], num_chunks=4, criterion=criterion,
        labels=(labels[0], labels[0][:2]) if rank == 1 else labels))
    # still usable after all of the above: a normal step
    out["after"] = _outcome(lambda: _step(p, s, rank, 4))
    # the same where one rank holds the inputs and the labels of a stream (DualPipeV:
    # rank 0), and where they are on different ranks (1F1B: rank 0 and rank 1)
    for name in ("dualpipev", "1f1b"):
        q, sq = build(name, rank, world, 4, timeout=20)
        xs, ys = make_batch(0, 4, False)
        ins, labs, _ = rank_io(sq, rank, xs, ys)
        few = (labs[0][:4],) if labs else ()
        out[f"few_labels_{name}"] = _outcome(lambda: q.step(
            *ins, num_chunks=4, criterion=criterion if labs else None, labels=few))
        out[f"after_{name}"] = _outcome(lambda: _step(q, sq, rank, 4))
        q.close()
    # NaN loss: reported in the losses, not an error
    xs, ys = make_batch(0, 4, False)
    ys = (ys[0].clone().fill_(float("nan")),)
    inputs, labels, _ = rank_io(s, rank, xs, ys)
    loss, _ = p.step(*inputs, num_chunks=4, criterion=criterion, labels=labels)
    out["nan_loss"] = None if loss is None else bool(torch.isnan(loss).all())
    # non-contiguous input: same losses as the contiguous one
    xs, ys = make_batch(0, 4, False)
    inputs, labels, _ = rank_io(s, rank, xs, ys)
    loss_c, _ = p.step(*inputs, num_chunks=4, criterion=criterion if labels else None,
                       labels=labels)
    nc = tuple(torch.stack([x, x], -1)[..., 0] for x in inputs)  # x, with stride 2
    if nc:
        assert not nc[0].is_contiguous()
    loss_n, _ = p.step(*nc, num_chunks=4, criterion=criterion if labels else None, labels=labels)
    out["noncontig_equal"] = None if loss_c is None else bool(torch.equal(loss_c, loss_n))
    # inputs passed where they are ignored: a warning
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        xs, ys = make_batch(0, 4, False)
        inputs, labels, _ = rank_io(s, rank, xs, ys)
        p.step(*(inputs or (xs[0][:4 * MB],)), num_chunks=4,
               criterion=criterion, labels=labels or (ys[0][:4 * MB],))
        out["warned"] = [str(x.message) for x in w]
    return out


class FailingStage(Stage):
    fail_at = None   # (kind, microbatch) on the failing rank: "F" or "B"
    seen = {"F": 0, "B": 0}

    def forward(self, x):
        if FailingStage.fail_at == ("F", FailingStage.seen["F"]):
            raise RuntimeError("injected failure in forward")
        FailingStage.seen["F"] += 1
        y = super().forward(x)
        if FailingStage.fail_at and FailingStage.fail_at[0] == "B":
            return _FailInBackward.apply(y)
        return y


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        if FailingStage.fail_at == ("B", FailingStage.seen["B"]):
            raise RuntimeError("injected failure in backward")
        FailingStage.seen["B"] += 1
        return g


def _pipe(rank, world, cls, name="dualpipe", N=8, timeout=10.0):
    from dualpipe import DualPipe, DualPipeV
    from dualpipe.schedules import get_schedule
    s = get_schedule(name, world, N)
    mods = [cls(stage) for (_st, stage) in s.placement[rank]]
    return (DualPipe if name == "dualpipe" else DualPipeV)(mods, timeout=timeout), s


def fail_mid_step(rank: int, world: int, failing_rank: int, fail_at, port2: int):
    FailingStage.fail_at = tuple(fail_at) if rank == failing_rank else None
    FailingStage.seen = {"F": 0, "B": 0}
    p, s = _pipe(rank, world, FailingStage, timeout=20.0)
    res = _outcome(lambda: _step(p, s, rank, 8))
    # the user's group still works, and a new pipeline can be built and used
    t = torch.ones(1)
    dist.all_reduce(t)
    FailingStage.fail_at = None
    p2, s2 = _pipe(rank, world, FailingStage, timeout=20.0)
    again = _outcome(lambda: _step(p2, s2, rank, 8))
    assert again[0] == "ok", again
    return res, float(t)


class SlowStage(Stage):
    hang_rank_sleep = 0.0

    def forward(self, x):
        if SlowStage.hang_rank_sleep:
            time.sleep(SlowStage.hang_rank_sleep)
            SlowStage.hang_rank_sleep = 0.0
        return super().forward(x)


def silent_peer(rank: int, world: int, mode: str):
    """mode 'no_step': rank 1 never calls step; 'hang': rank 1 hangs in a forward;
    'killed': rank 1 dies in its first forward."""
    if mode == "hang" and rank == 1:
        SlowStage.hang_rank_sleep = 6.0
    p, s = _pipe(rank, world, SlowStage, timeout=2.0)
    if mode == "no_step" and rank == 1:
        time.sleep(4.0)
        return ("skipped", "", 0.0)
    if mode == "killed" and rank == 1:
        class Die(nn.Module):
            def forward(self, x):
                os._exit(3)
        p.module[0].l1 = Die()
    return _outcome(lambda: _step(p, s, rank, 8))


def transport_choice(rank: int, world: int):
    """transport= misuse: an unknown name, and ranks asking for different transports
    ("shm" required on rank 0, "group" elsewhere): every rank must raise ValueError, none
    may hang; afterwards a pipeline with agreeing arguments works."""
    out = {}
    out["unknown"] = _outcome(lambda: build("dualpipev", rank, world, 4, timeout=10,
                                            transport="fast"))
    out["disagree"] = _outcome(lambda: build("dualpipev", rank, world, 4, timeout=10,
                                             transport="shm" if rank == 0 else "group"))
    p, s = build("dualpipev", rank, world, 4, timeout=10, transport="shm")
    out["then"] = (_outcome(lambda: _step(p, s, rank, 4)), p.transport)
    return out


def _ctor_files(world: int) -> list[str] | None:
    """Files in the ring directory of the shared-memory agreement of the last pipeline
    this rank tried to build (None: no rank got as far as choosing a directory)."""
    from dualpipe.runtime import transport
    store = dist.distributed_c10d._get_default_store()
    gname = str(getattr(dist.group.WORLD, "group_name", "") or "default")
    key = f"dualpipe/{gname}/{transport._clone_count[gname]}/shm/1/where"
    if not store.check([key]):
        return None
    directory, token = store.get(key).decode().split("\n")
    return sorted(f for f in os.listdir(directory) if token in f)


def ctor_missing(rank: int, world: int, missing: int, late: bool):
    """Rank ``missing`` never builds the pipeline (``late``: builds it after the others
    gave up); every rank that builds it must raise PipelineTimeout within its timeout,
    and no rank may leave a file of the agreement behind."""
    from dualpipe import PipelineError, PipelineTimeout
    store = dist.distributed_c10d._get_default_store()
    TO = 2.0
    res = None
    if rank == missing:
        time.sleep(TO + 0.5)
    if rank != missing or late:
        t = time.monotonic()
        try:
            _pipe(rank, world, Stage, name="dualpipev", N=2 * world, timeout=TO)
            res = ("ok", "", time.monotonic() - t, False, False)
        except Exception as e:  # noqa: BLE001 - reported to the test
            res = (type(e).__name__, str(e), time.monotonic() - t,
                   isinstance(e, PipelineError), isinstance(e, PipelineTimeout))
    store.set(f"ctor_missing/done/{rank}", "1")
    store.wait([f"ctor_missing/done/{r}" for r in range(world)], datetime.timedelta(seconds=30))
    files = _ctor_files(world) if rank != missing or late else None
    t = torch.ones(1)
    dist.all_reduce(t)  # the user's group still works
    return res, files, float(t)
