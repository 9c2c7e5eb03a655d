"""Per-rank functions (and their single-process references) for the long-run, state and
randomised-schedule tests.  Module level, so spawned rank processes can import them."""
from __future__ import annotations

import gc
import io

import torch
import torch.distributed as dist

from tests.models import MB, Stage, criterion, make_batch
from tests.workers import build, rank_io

# --------------------------------------------------------------------------- measuring


def rss_bytes() -> int:
    """Resident set size of this process (Linux ``/proc``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def live_tensors() -> dict:
    """Live torch tensors of this process after a full collection: how many, the bytes
    their elements span (``numel * element_size``) and the bytes of their distinct
    storages (views counted once)."""
    gc.collect()
    count = elem_bytes = 0
    storages: dict[int, int] = {}
    for o in gc.get_objects():
        # type(), not isinstance(): isinstance reads __class__, which some proxies
        # (deprecated torch.distributed aliases) turn into warnings
        if not issubclass(type(o), torch.Tensor):
            continue
        count += 1
        elem_bytes += o.numel() * o.element_size()
        try:
            st = o.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # noqa: BLE001 - tensors without storage (e.g. sparse)
            pass
    return {"count": count, "bytes": elem_bytes, "storage_bytes": sum(storages.values()),
            "rss": rss_bytes()}


# --------------------------------------------------------------------------- training


def make_optimizer(params, lr: float, momentum: float) -> torch.optim.Optimizer:
    # foreach=False: the same per-parameter kernels in the ranks and in the reference
    return torch.optim.SGD(params, lr=lr, momentum=momentum, foreach=False)


def step_once(p, s, rank: int, step: int, N: int):
    """One pipeline step on batch ``step``; returns this rank's losses (or None)."""
    xs, ys = make_batch(step, N, False)
    inputs, labels, _ = rank_io(s, rank, xs, ys)
    loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                     labels=labels)
    return loss


def train(rank: int, world: int, name: str, N: int, steps: int, lr: float, momentum: float,
          measure_at: list[int], split_linear: bool = False, reduce: bool = True):
    """Train ``steps`` steps with SGD(momentum); for DualPipe reduce the duplicated
    stages' gradients before each optimizer step.  Returns the losses of every step,
    this rank's loss slice and live-tensor/RSS snapshots after the steps in
    ``measure_at`` (counted from 1: "after k steps")."""
    from dualpipe import reduce_dualpipe_grads
    torch.manual_seed(0)
    p, s = build(name, rank, world, N, timeout=60, split_linear_weight_grads=split_linear)
    opt = make_optimizer(p.parameters(), lr, momentum)
    loss_slice = rank_io(s, rank, *make_batch(0, N, False))[2]
    losses, mem = [], {}
    want = set(measure_at)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = step_once(p, s, rank, step, N)
        if reduce:
            reduce_dualpipe_grads(p)
        opt.step()
        # plain floats (float32 values held exactly), so the record itself adds no
        # tensors to what is measured
        losses.append(None if loss is None else loss.tolist())
        del loss
        if step + 1 in want:
            mem[step + 1] = live_tensors()
    return {"losses": losses, "loss_slice": loss_slice, "mem": mem,
            "peak": p.last_stats.peak_activations}


def reference_training(num_stages: int, N: int, steps: int, lr: float, momentum: float,
                       halves: bool = False):
    """Single process, one thread: the full model (every stage once) trained with the
    same optimizer on the same micro-batches.  Returns per-step losses ``float[N]``.

    ``halves=False`` accumulates every parameter's gradient over micro-batches
    ``0..N-1`` in order.  ``halves=True`` sums in DualPipe's order: micro-batches
    ``0..N/2-1`` (the copy of the stage in the forward direction) and ``N/2..N-1``
    (the copy in the reverse direction) accumulated separately, then added, which is
    what :func:`dualpipe.reduce_dualpipe_grads` gives both copies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stages = [Stage(s) for s in range(num_stages)]
        params = [q for st in stages for q in st.parameters()]
        opt = make_optimizer(params, lr, momentum)
        out = []
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            xs, ys = make_batch(step, N, False)
            xm, ym = xs[0].tensor_split(N), ys[0].tensor_split(N)
            ls = []
            first_half = None
            for i in range(N):
                if halves and i == N // 2:
                    first_half = [q.grad for q in params]
                    for q in params:
                        q.grad = None
                h = xm[i]
                for st in stages:
                    h = st(h)
                loss = criterion(h, ym[i])
                loss.backward()
                ls.append(loss.detach())
            if first_half is not None:
                for q, g in zip(params, first_half):
                    q.grad = g + q.grad
            opt.step()
            out.append(torch.stack(ls))
        return out
    finally:
        torch.set_num_threads(threads)


def reference_copy_grads(name: str, num_stages: int, N: int, steps: int) -> dict:
    """Single process, one thread: the gradient each *copy* of a stage accumulates over
    ``steps`` steps without zeroing, keyed ``(stream, stage) -> {param: grad}``.

    DualPipe holds every stage twice: the copy in stream 0 (micro-batches
    ``0..N/2-1``) and the copy in stream 1 (``N/2..N-1``); each accumulates only its
    stream's micro-batches, in order.  Other schedules have one stream."""
    from dualpipe.schedules import get_schedule
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        streams = [(st.first_microbatch, st.num_microbatches)
                   for st in get_schedule(name, _ranks_of(name, num_stages), N).streams]
        copies = [[Stage(s) for s in range(num_stages)] for _ in streams]
        for step in range(steps):
            xs, ys = make_batch(step, N, False)
            xm, ym = xs[0].tensor_split(N), ys[0].tensor_split(N)
            for stages, (first, n) in zip(copies, streams):
                for i in range(first, first + n):
                    h = xm[i]
                    for st in stages:
                        h = st(h)
                    criterion(h, ym[i]).backward()
        return {(si, s): {n: q.grad.clone() for n, q in st.named_parameters()}
                for si, stages in enumerate(copies) for s, st in enumerate(stages)}
    finally:
        torch.set_num_threads(threads)


def _ranks_of(name: str, num_stages: int) -> int:
    return num_stages // 2 if name == "dualpipev" else num_stages


def accumulate(rank: int, world: int, name: str, N: int, split_linear: bool):
    """Gradients of step(batch 0) and step(batch 1) separately (zeroed in between)
    and of the two steps without zero_grad in between, per stage of this rank."""
    p, s = build(name, rank, world, N, timeout=60, split_linear_weight_grads=split_linear)

    def grads():
        return {(c, n): q.grad.clone() for c, m in enumerate(p.module)
                for n, q in m.named_parameters()}

    step_once(p, s, rank, 0, N)
    g0 = grads()
    p.zero_grad(set_to_none=True)
    step_once(p, s, rank, 1, N)
    g1 = grads()
    p.zero_grad(set_to_none=False)   # zeros, not None: accumulation starts from 0-tensors
    step_once(p, s, rank, 0, N)
    step_once(p, s, rank, 1, N)
    g01 = grads()
    import torch.nn as nn
    split = sum("forward" in m.__dict__ for m in p.modules() if type(m) is nn.Linear)
    return {"g0": g0, "g1": g1, "g01": g01, "placement": list(s.placement[rank]),
            "split_layers": split}


# --------------------------------------------------------------------------- state


def _flat_params(mod) -> torch.Tensor:
    return torch.cat([q.detach().reshape(-1) for q in mod.parameters()])


def state_round_trip(rank: int, world: int, name: str, N: int, before: int, after: int,
                     lr: float, momentum: float):
    """Train ``before`` steps, save model and optimizer state (through torch.save
    bytes), train ``after`` more steps; then build a fresh pipeline whose stages start
    from other weights, load the saved state and train the same ``after`` steps.
    Returns both runs' losses of the ``after`` steps and the final parameters."""
    from dualpipe import reduce_dualpipe_grads

    def run(p, s, opt, first, n):
        out = []
        for step in range(first, first + n):
            opt.zero_grad(set_to_none=True)
            loss = step_once(p, s, rank, step, N)
            reduce_dualpipe_grads(p)
            opt.step()
            out.append(None if loss is None else loss.clone())
        return out

    p, s = build(name, rank, world, N, timeout=60)
    opt = make_optimizer(p.parameters(), lr, momentum)
    run(p, s, opt, 0, before)
    buf = io.BytesIO()
    torch.save({"model": p.state_dict(), "opt": opt.state_dict()}, buf)
    keys = sorted(p.state_dict())
    cont = run(p, s, opt, before, after)
    final = {k: v.clone() for k, v in p.state_dict().items()}

    # a fresh pipeline with different initial weights, loaded from the saved bytes
    p2, s2 = build(name, rank, world, N, timeout=60)
    with torch.no_grad():
        for q in p2.parameters():
            q.normal_()
    opt2 = make_optimizer(p2.parameters(), lr, momentum)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    p2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    resumed = run(p2, s2, opt2, before, after)
    final2 = {k: v.clone() for k, v in p2.state_dict().items()}
    return {"keys": keys, "cont": cont, "resumed": resumed, "final": final, "final2": final2}


def copies_identical(rank: int, world: int, N: int, steps: int, lr: float, momentum: float,
                     reduce: bool):
    """DualPipe: after ``steps`` optimizer steps (gradients reduced across the pair when
    ``reduce``), swap parameters with the partner rank over the user's process group
    and compare the two copies of each stage on this rank.  Returns, per chunk, whether
    they are bitwise equal and the largest difference, plus the parameters."""
    from dualpipe import reduce_dualpipe_grads
    p, s = build("dualpipe", rank, world, N, timeout=60)
    opt = make_optimizer(p.parameters(), lr, momentum)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        step_once(p, s, rank, step, N)
        if reduce:
            reduce_dualpipe_grads(p)
        opt.step()
    partner = world - 1 - rank
    mine = [_flat_params(p.module[c]) for c in (0, 1)]
    # my chunk c holds the stage the partner holds as chunk 1-c
    theirs = [torch.empty_like(mine[1]), torch.empty_like(mine[0])]
    ops = [dist.P2POp(dist.isend, mine[0], partner), dist.P2POp(dist.isend, mine[1], partner),
           dist.P2POp(dist.irecv, theirs[0], partner), dist.P2POp(dist.irecv, theirs[1], partner)]
    for r in dist.batch_isend_irecv(ops):
        r.wait()
    # theirs[0] is the partner's chunk 0 = my chunk 1's stage, theirs[1] = my chunk 0's
    out = {}
    for c, other in ((0, theirs[1]), (1, theirs[0])):
        out[c] = {"stage": s.placement[rank][c][1], "equal": bool(torch.equal(mine[c], other)),
                  "maxdiff": float((mine[c] - other).abs().max())}
    return out


# --------------------------------------------------------------------------- random cases


class _Live:
    """Activations this process holds, counted by the stages themselves: +1 when a
    stage's forward runs (training), -1 when the gradient of its output has been
    computed (the stage's backward, or its input-gradient part).  Independent of the
    runtime's own bookkeeping (``last_stats.peak_activations``)."""

    now = 0
    peak = 0


class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y):
        _Live.now += 1
        _Live.peak = max(_Live.peak, _Live.now)
        return y.clone()   # a new tensor: the runtime rejects views of its outputs

    @staticmethod
    def backward(ctx, g):
        _Live.now -= 1
        return g


class _Counting:
    def forward(self, *args):
        out = super().forward(*args)
        if not torch.is_grad_enabled():
            return out
        if isinstance(out, torch.Tensor):
            return _Mark.apply(out)
        return (_Mark.apply(out[0]),) + tuple(out[1:])


class CountingStage(_Counting, Stage):
    pass


def _counting_hook_stage():
    from tests.models import HookStage

    class CountingHookStage(_Counting, HookStage):
        pass
    return CountingHookStage


def random_cases(rank: int, world: int, cases: list[dict]):
    """Cases drawn by the property test, run one after the other on these ranks.
    Per case: losses, loss slice, peak activations per step (the runtime's figure and
    the stages' own count), this rank's gradients and which stages it holds."""
    from dualpipe import DualPipe, DualPipeV, Pipeline
    from dualpipe.schedules import get_schedule
    out = []
    for case in cases:
        name, N, tuple_io = case["schedule"], case["chunks"], case.get("tuple_io", False)
        s = get_schedule(name, world, N)
        cls = _counting_hook_stage() if case.get("hook") else CountingStage
        mods = [cls(stage, tuple_io) for (_st, stage) in s.placement[rank]]
        kw = dict(split_linear_weight_grads=case.get("split_linear", False), timeout=60)
        if name == "dualpipe":
            p = DualPipe(mods, **kw)
        elif name == "dualpipev":
            p = DualPipeV(mods, **kw)
        else:
            p = Pipeline(mods[0], schedule=name, **kw)
        res = {"losses": [], "peaks": [], "counted_peaks": [], "loss_slice": None}
        for step in range(case.get("steps", 1)):
            xs, ys = make_batch(step, N, tuple_io)
            inputs, labels, sl = rank_io(s, rank, xs, ys)
            res["loss_slice"] = sl
            _Live.now = _Live.peak = 0
            loss, _ = p.step(*inputs, num_chunks=N, criterion=criterion if labels else None,
                             labels=labels)
            res["losses"].append(loss)
            res["peaks"].append(p.last_stats.peak_activations)
            res["counted_peaks"].append((_Live.peak, _Live.now))
        res["grads"] = {}
        for c, (_st, stage) in enumerate(s.placement[rank]):
            res["grads"].setdefault(stage, []).append(
                {n: q.grad.clone() for n, q in p.module[c].named_parameters()
                 if q.grad is not None})
        out.append(res)
    return out


# --------------------------------------------------------------------------- failures


def _outcome(fn):
    import time
    t = time.monotonic()
    try:
        fn()
        return ("ok", "", time.monotonic() - t)
    except Exception as e:  # noqa: BLE001 - reported to the test
        return (type(e).__name__, str(e), time.monotonic() - t)


class _FailW(torch.autograd.Function):
    """Identity whose deferred weight-gradient closure raises while ``fail`` is set:
    a failure inside a ``W`` action (the zero-bubble weight pass)."""

    fail = False

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        from dualpipe import WeightGradStore
        if WeightGradStore.enabled:
            def weight_pass():
                if _FailW.fail:
                    raise RuntimeError("injected failure in a weight-gradient pass")
            WeightGradStore.put(weight_pass)
        return g


class FailWStage(Stage):
    def forward(self, x):
        return _FailW.apply(super().forward(x))


class FailFStage(Stage):
    fail = False

    def forward(self, x):
        if FailFStage.fail:
            raise RuntimeError("injected failure in forward")
        return super().forward(x)


def _pipe(cls, name: str, rank: int, world: int, N: int, timeout: float):
    from dualpipe import DualPipe, DualPipeV
    from dualpipe.schedules import get_schedule
    s = get_schedule(name, world, N)
    mods = [cls(stage) for (_st, stage) in s.placement[rank]]
    return (DualPipe if name == "dualpipe" else DualPipeV)(mods, timeout=timeout), s


def _describe(e: BaseException, t0: float, where: str) -> tuple:
    import time
    return (type(e).__name__, str(e), where, time.monotonic() - t0)


def fail_resume(rank: int, world: int, name: str, N: int, steps: int, fail_rank: int,
                fail_step: int, lr: float, momentum: float):
    """Train ``steps`` steps; at ``fail_step`` the first weight pass (W action) of
    ``fail_rank`` raises, early in that rank's step, so every rank is still inside
    step().  Every rank records the error, whether the failed step left the weights
    as they were, what the failed pipeline does when used again and whether the user's
    group still works; then builds a new pipeline over the same modules, keeps the
    optimizer and retries the step.  Returns the losses of all ``steps`` steps."""
    import time

    from dualpipe import PipelineError, reduce_dualpipe_grads
    p, s = _pipe(FailWStage, name, rank, world, N, timeout=60)
    opt = make_optimizer(p.parameters(), lr, momentum)
    loss_slice = rank_io(s, rank, *make_batch(0, N, False))[2]
    losses, info, step = [], {}, 0
    while step < steps:
        opt.zero_grad(set_to_none=True)
        _FailW.fail = rank == fail_rank and step == fail_step and not info
        before = [q.detach().clone() for q in p.parameters()]
        t0 = time.monotonic()
        err = None
        try:
            loss = step_once(p, s, rank, step, N)
        except PipelineError as e:
            # keep only a description: a live exception keeps the failed step's frames,
            # and with them its communication, alive
            err = _describe(e, t0, "step")
        if err is None:
            reduce_dualpipe_grads(p)
            opt.step()
            losses.append(None if loss is None else loss.tolist())
            step += 1
            continue
        _FailW.fail = False
        info["error"], info["failed_at"] = err, step
        info["weights_unchanged"] = all(torch.equal(a, q) for a, q in zip(before, p.parameters()))
        info["step_again"] = _outcome(lambda: step_once(p, s, rank, step, N))
        info["reduce_again"] = _outcome(lambda: reduce_dualpipe_grads(p))
        t = torch.ones(1)
        dist.all_reduce(t)                        # the user's group still works
        info["allreduce"] = float(t)
        p = type(p)(list(p.module), timeout=60)   # same modules, same optimizer
        # and the failed step is retried
    return dict(info, losses=losses, loss_slice=loss_slice)


def late_failure(rank: int, world: int, N: int, fail_rank: int, timeout: float):
    """DualPipe: the *last* action of ``fail_rank``'s step (a deferred weight pass)
    raises, after the other ranks may have returned from step().  Each rank goes on as
    a training loop does (reduce_dualpipe_grads, optimizer, the next step) and records
    the first error it meets, where, and how long after the failing step began."""
    import time

    from dualpipe import reduce_dualpipe_grads
    p, s = _pipe(FailWStage, "dualpipe", rank, world, N, timeout=timeout)
    step_once(p, s, rank, 0, N)
    reduce_dualpipe_grads(p)
    p.zero_grad()
    t0 = time.monotonic()
    out = None
    where = "step"
    try:
        _FailW.fail = rank == fail_rank
        step_once(p, s, rank, 1, N)
        _FailW.fail = False
        where = "reduce_dualpipe_grads"
        reduce_dualpipe_grads(p)
        where = "next step"
        step_once(p, s, rank, 2, N)
        out = ("ok", "", "", time.monotonic() - t0)
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = _describe(e, t0, where)
    finally:
        _FailW.fail = False
    dist.barrier()   # the ranks leave the scenario together
    return out


def fast_stop(rank: int, world: int, name: str, N: int, fail_rank: int, timeout: float):
    """A forward raises on ``fail_rank`` in the first step, with a short ``timeout``:
    what each rank raises and how long it took."""
    FailFStage.fail = rank == fail_rank
    try:
        p, s = _pipe(FailFStage, name, rank, world, N, timeout=timeout)
        out = _outcome(lambda: step_once(p, s, rank, 0, N))
    finally:
        FailFStage.fail = False
    dist.barrier()
    return out


def partner_skips_reduce(rank: int, world: int, N: int, skipper: int, timeout: float):
    """DualPipe: one rank forgets reduce_dualpipe_grads; what its partner's call raises."""
    p, s = _pipe(Stage, "dualpipe", rank, world, N, timeout=timeout)
    step_once(p, s, rank, 0, N)
    from dualpipe import reduce_dualpipe_grads
    out = ("skipped", "", 0.0) if rank == skipper else _outcome(lambda: reduce_dualpipe_grads(p))
    dist.barrier()
    return out


# --------------------------------------------------------------------------- sessions


def _guard(fn, *args, **kw):
    """Run one scenario; a failure is returned (not raised) so the next scenario of the
    session still runs and each test reports its own scenario."""
    import traceback
    try:
        return {"ok": True, "value": fn(*args, **kw)}
    except Exception as e:  # noqa: BLE001 - reported to the test
        return {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}


def session(rank: int, world: int, name: str, N: int, cfg: dict):
    """Every scenario the long-run and state tests need on one set of ranks, one after
    the other (spawning ranks costs seconds on a small machine; the scenarios build
    their own pipelines on the same process group)."""
    lr, mom = cfg["lr"], cfg["momentum"]
    out = {"train": _guard(train, rank, world, name, N, cfg["steps"], lr, mom, cfg["measure_at"])}
    out["accumulate"] = _guard(accumulate, rank, world, name, N, False)
    out["accumulate_split"] = _guard(accumulate, rank, world, name, N, True)
    out["state"] = _guard(state_round_trip, rank, world, name, N, cfg["state_before"],
                          cfg["state_after"], lr, mom)
    if name == "dualpipe":
        out["copies"] = _guard(copies_identical, rank, world, N, cfg["copies_steps"], lr, mom, True)
        out["copies_unreduced"] = _guard(copies_identical, rank, world, N, cfg["copies_steps"],
                                         lr, mom, False)
        # the failure scenarios last: each ends with a barrier on the user's group
        out["fail_resume"] = _guard(fail_resume, rank, world, name, N, cfg["fail_steps"], 0,
                                    cfg["fail_step"], lr, mom)
        out["skip_reduce"] = _guard(partner_skips_reduce, rank, world, N, world - 1, 3.0)
        out["late_failure"] = _guard(late_failure, rank, world, N, 2, 3.0)
    else:
        out["fast_stop"] = _guard(fast_stop, rank, world, name, N, 1, 3.0)
    return out


# Shared by tests/test_long_run.py and tests/test_state.py: the optimizer, the step
# counts and the sessions (run once per pytest process, whichever file asks first).
LR, MOMENTUM = 0.01, 0.5
SESSION_CFG = {"lr": LR, "momentum": MOMENTUM, "steps": 30, "measure_at": [1, 10, 20, 30],
               "state_before": 3, "state_after": 4, "copies_steps": 5,
               "fail_steps": 4, "fail_step": 2}
SESSIONS = {"dualpipe": (4, 8), "dualpipev": (2, 4)}   # name -> (ranks, chunks)
_session_cache: dict[str, list] = {}


def run_session(name: str) -> list[dict]:
    """The per-rank results of :func:`session` for ``name`` (cached per process)."""
    if name not in _session_cache:
        from dualpipe.launch import run_ranks
        world, N = SESSIONS[name]
        _session_cache[name] = run_ranks(session, world, name, N, SESSION_CFG, timeout=400)
    return _session_cache[name]


def session_part(name: str, part: str) -> list:
    """One scenario's per-rank values from :func:`run_session`; fails the calling test
    with the rank's traceback if the scenario raised on any rank."""
    res = run_session(name)
    out = []
    for rank, r in enumerate(res):
        if not r[part]["ok"]:
            raise AssertionError(f"{name} rank {rank}, {part}: {r[part]['error']}")
        out.append(r[part]["value"])
    return out


def num_stages(name: str, world: int) -> int:
    return 2 * world if name == "dualpipev" else world


__all__ = ["MB", "rss_bytes", "live_tensors", "train", "reference_training", "accumulate",
           "reference_copy_grads", "state_round_trip", "copies_identical", "random_cases",
           "CountingStage", "FailWStage", "FailFStage", "fail_resume", "late_failure",
           "fast_stop", "partner_skips_reduce", "session", "run_session", "session_part",
           "SESSIONS", "SESSION_CFG", "LR", "MOMENTUM", "num_stages"]
