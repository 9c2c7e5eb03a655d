"""Fault injection (issue 15): freeze a rank (SIGSTOP), kill one at a random moment
(SIGKILL), let the runtime raise its own errors, fail a constructor, and check what
every other rank sees.

Two halves, both importable without pytest (``bench/fault_sweep.py`` runs the matrix):

* **per-rank workers** (module level, so spawned ranks import them) that inject the
  fault and return what each rank saw: the exception's type, message,
  ``failed_rank`` (read with ``getattr``: ``None`` where the runtime does not set it),
  and the wall-clock time (``time.time()``: one host clock for every rank) it reached
  the rank;
* **parent-side runners** (``run_cases``, ``run_sigkill``) that spawn 4 ranks on
  gloo, list ``/dev/shm/dualpipe-*`` before and after, and turn the ranks' records into
  per-case numbers (detection latency per survivor, naming, split steps, files left)
  and a list of **violations** of the promises of issue 15 ("Done means"):

  - SIGSTOP of any rank (rank 0 hosts the TCPStore) -> every other rank raises
    ``PipelineTimeout`` within ``timeout + 2 s`` of the freeze, ``failed_rank`` is the
    frozen rank and the message names it (``rank <victim>``);
  - SIGKILL at a random moment of a training loop -> every survivor raises a
    ``PipelineError`` within 2 s naming the dead rank, and all survivors fail at the
    same step (a *split*, survivors disagreeing, must never happen);
  - an error the runtime raises itself (a criterion returning ``None``, a stage whose
    output shape changes between micro-batches) -> every rank raises ``PipelineError``
    within 2 s, ``failed_rank`` the raising rank;
  - a constructor that fails (one rank never builds the pipeline: ``PipelineTimeout``,
    never a bare ``overlap.p2p.PeerTimeout``; ranks asking for different transports)
    and every step failure above leave no file of theirs in ``/dev/shm``.

The transport is chosen per spawn through ``$DUALPIPE_TRANSPORT`` ("auto": shared
memory on this host; "group": the private gloo group), set in each rank before any
pipeline is built.  Pipeline rank == group rank here.
"""
from __future__ import annotations

import atexit
import glob
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time

WORLD = 4
TRANSPORTS = ("auto", "group")
SCHEDULES = ("dualpipe", "dualpipev")
CHUNKS = 8
SHM_DIR = "/dev/shm"
BOUND = 2.0          # s: detection promise (after the timeout for SIGSTOP)
STOP_TIMEOUT = 3.0   # s: the pipeline timeout of the SIGSTOP cases
RAISE_TIMEOUT = 6.0  # s: pipeline timeout of the runtime-error cases (> BOUND: a timeout
#                      is not what may end them)
KILL_TIMEOUT = 30.0  # s: pipeline timeout of the SIGKILL runs (detection must not be it)
CTOR_TIMEOUT = 3.0   # s: pipeline timeout of the constructor that times out


# =========================================================================== ranks

def _err(e: BaseException) -> dict:
    """What a rank saw, stamped with the host clock."""
    from dualpipe import PipelineError, PipelineTimeout
    try:
        from overlap.p2p import PeerTimeout
    except ImportError:  # pragma: no cover
        PeerTimeout = ()  # noqa: N806
    return {"type": type(e).__name__, "msg": str(e)[:3000],
            "failed_rank": getattr(e, "failed_rank", None),
            "pipeline_error": isinstance(e, PipelineError),
            "timeout": isinstance(e, PipelineTimeout),
            "peer_timeout": bool(PeerTimeout) and isinstance(e, PeerTimeout),
            "t": time.time()}


def _build(schedule: str, rank: int, world: int, timeout: float, cls, transport="auto",
           N: int = CHUNKS):
    from dualpipe import DualPipe, DualPipeV
    from dualpipe.schedules import get_schedule
    s = get_schedule(schedule, world, N)
    mods = [cls(stage) for (_st, stage) in s.placement[rank]]
    kind = DualPipe if schedule == "dualpipe" else DualPipeV
    return kind(mods, timeout=timeout, transport=transport), s


def _token(p) -> str | None:
    """The shared-memory files' token of pipeline ``p`` (their names contain it)."""
    return getattr(getattr(p, "_p2p", None), "token", None)


def _ctor_token() -> str | None:
    """Best effort, after a constructor failed: the token rank 0 published for the last
    pipeline this rank began to build (read from the store; None if not there)."""
    try:
        import torch.distributed as dist

        from dualpipe.runtime import transport
        group = dist.distributed_c10d._get_default_group()
        store = transport.group_store(group)
        gname = str(getattr(group, "group_name", "") or "default")
        prefix = f"dualpipe/{gname}/{transport._clone_count.get(gname, 0)}"
        gen = store.add(f"{prefix}/shm/calls/{dist.get_rank()}", 0)
        key = f"{prefix}/shm/{gen}/where"
        if store.check([key]):
            return store.get(key).decode().split("\n")[1]
    except Exception:  # noqa: BLE001 - the layout of the keys is the runtime's business
        pass
    return None


def _step(p, s, rank: int, step: int, crit=None, N: int = CHUNKS):
    from tests.models import criterion, make_batch
    from tests.workers import rank_io
    xs, ys = make_batch(step, N, False)
    inputs, labels, _ = rank_io(s, rank, xs, ys)
    return p.step(*inputs, num_chunks=N,
                  criterion=(crit or criterion) if labels else None, labels=labels)


def _close(p) -> None:
    try:
        if p is not None:
            p.close()
    except Exception:  # noqa: BLE001 - closing after a failure is the runtime's no-op
        pass


def _touch(path: str) -> None:
    with open(path, "w"):
        pass


# --------------------------------------------------------------------------- stages

def _stage_classes():
    """Stage subclasses made on first use (torch is imported in the ranks only)."""
    global FreezeStage, ShapeStage
    if FreezeStage is not None:
        return
    import torch

    from tests.models import Stage

    class _Freeze(Stage):
        """Counts this rank's forwards; on the victim, the ``(step, forward)`` of
        ``plan`` stops the process (see :func:`_freeze`)."""
        plan = None
        step = 0
        seen = 0
        args = None

        def forward(self, x):
            c = type(self)
            if c.plan is not None and c.plan == (c.step, c.seen):
                c.plan = None
                _freeze(*c.args)
            c.seen += 1
            return super().forward(x)

    class _Shape(Stage):
        """From step ``at[0]``, forward ``at[1]`` of this module returns one more
        column than its earlier micro-batches (only that micro-batch)."""
        at = None
        t_inject = None

        def __init__(self, stage):
            super().__init__(stage)
            self.step = 0
            self.seen = 0
            self.active = False

        def forward(self, x):
            y = super().forward(x)
            at = type(self).at
            if self.active and at is not None and (self.step, self.seen) == tuple(at):
                type(self).t_inject = type(self).t_inject or time.time()
                y = torch.cat([y, y[:, :1]], 1)
            self.seen += 1
            return y

    FreezeStage, ShapeStage = _Freeze, _Shape


FreezeStage = ShapeStage = None  # made by _stage_classes()


def _freeze(mark: str, done_dir: str, survivors: int, limit: float) -> None:
    """Stop this process (SIGSTOP) after starting a detached shell that resumes it
    (SIGCONT) once every survivor has written its file into ``done_dir`` or after
    ``limit`` seconds, whichever comes first; ``mark`` gets the time of the freeze."""
    pid = os.getpid()
    d = shlex.quote(done_dir)
    script = (f'end=$(( $(date +%s) + {int(math.ceil(limit))} )); '
              f'while [ "$(date +%s)" -lt "$end" ]; do '
              f'[ "$(ls {d} | wc -l)" -ge {survivors} ] && break; sleep 0.1; done; '
              f'kill -CONT {pid}')
    subprocess.Popen(["sh", "-c", script], start_new_session=True, close_fds=True,
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    with open(mark, "w") as f:
        f.write(repr(time.time()))
    os.kill(pid, signal.SIGSTOP)


def _watch_raise(text: str) -> dict:
    """Stamp the first PipelineError made on this rank whose message contains ``text``
    (the moment the runtime raised its own error)."""
    from dualpipe import runtime as rt
    seen: dict = {}
    orig = rt.PipelineError.__init__

    def init(self, msg, *a, **kw):
        if "t" not in seen and text in str(msg):
            seen["t"] = time.time()
        orig(self, msg, *a, **kw)

    rt.PipelineError.__init__ = init
    seen["undo"] = lambda: setattr(rt.PipelineError, "__init__", orig)
    return seen


# --------------------------------------------------------------------------- cases

def cases_worker(rank: int, world: int, transport: str, tmpdir: str, cases: list[dict]):
    """Run ``cases`` one after another on this rank (a fresh pipeline each, every rank
    meeting at a barrier of the user's group first) and return one record per case.

    kinds: ``stop`` (victim freezes in forward ``forward`` of step ``step``), ``no_loss``
    (the criterion returns None on rank ``raiser`` from step 1), ``shape`` (a stage of
    rank ``raiser`` changes its output shape at forward 2 of step 1), ``ctor_mismatch``
    (rank ``raiser`` builds with transport="group", the others "shm"), ``ctor_absent``
    (rank ``raiser`` never builds; must be the last case: the others' pipeline count is
    ahead of it afterwards)."""
    import torch.distributed as dist
    os.environ["DUALPIPE_TRANSPORT"] = transport
    _stage_classes()
    out = []
    for i, case in enumerate(cases):
        d = os.path.join(tmpdir, f"case-{i}")
        os.makedirs(os.path.join(d, "done"), exist_ok=True)
        dist.barrier()
        kind = case["kind"]
        rec = {"case": i, "rank": rank, "kind": kind, "steps_ok": 0, "error": None,
               "transport": None, "token": None, "t_start": time.time()}
        fn = {"stop": _case_stop, "no_loss": _case_raise, "shape": _case_raise,
              "ctor_mismatch": _case_ctor, "ctor_absent": _case_ctor}[kind]
        fn(rank, world, case, d, rec)
        out.append(rec)
    return out


def _case_stop(rank, world, case, d, rec):
    victim, schedule = case["victim"], case["schedule"]
    timeout = case.get("timeout", STOP_TIMEOUT)
    C = FreezeStage
    C.plan = (case["step"], case["forward"]) if rank == victim else None
    C.step = C.seen = 0
    C.args = (os.path.join(d, "frozen_at"), os.path.join(d, "done"), world - 1,
              timeout + 6.0)
    p = None
    try:
        p, s = _build(schedule, rank, world, timeout, C)
        rec["transport"], rec["token"] = p.transport, _token(p)
        for st in range(case["step"] + 1):
            C.step, C.seen = st, 0
            _step(p, s, rank, st)
            rec["steps_ok"] += 1
        _close(p)
    except Exception as e:  # noqa: BLE001 - the record is the result
        rec["error"] = _err(e)
    C.plan = None
    if rank != victim:
        _touch(os.path.join(d, "done", str(rank)))
    del p


def _case_raise(rank, world, case, d, rec):
    schedule, raiser, kind = case["schedule"], case["raiser"], case["kind"]
    timeout = case.get("timeout", RAISE_TIMEOUT)
    from tests.models import criterion
    C = ShapeStage
    C.at, C.t_inject = (1, 2), None
    inject = {"t": None}

    def no_loss(*args):
        inject["t"] = inject["t"] or time.time()
        return None

    watch = _watch_raise("no loss" if kind == "no_loss" else "changed from") \
        if rank == raiser else {}
    p = None
    try:
        p, s = _build(schedule, rank, world, timeout, C)
        rec["transport"], rec["token"] = p.transport, _token(p)
        if kind == "shape" and rank == raiser:
            p.module[0].active = True
        for st in range(3):
            for m in p.module:
                m.step, m.seen = st, 0
            crit = no_loss if (kind == "no_loss" and rank == raiser and st >= 1) else criterion
            _step(p, s, rank, st, crit=crit)
            rec["steps_ok"] += 1
        _close(p)
    except Exception as e:  # noqa: BLE001
        rec["error"] = _err(e)
    if watch:
        watch["undo"]()
    rec["t_raised"] = watch.get("t")
    rec["t_inject"] = inject["t"] if kind == "no_loss" else C.t_inject
    del p


def _case_ctor(rank, world, case, d, rec):
    from tests.models import Stage
    kind, raiser, schedule = case["kind"], case["raiser"], case["schedule"]
    timeout = case.get("timeout", CTOR_TIMEOUT)
    done = os.path.join(d, "done")
    if kind == "ctor_absent" and rank == raiser:
        # never builds it: waits until the others have given up (or long after they should)
        end = time.monotonic() + timeout + 6.0
        while len(os.listdir(done)) < world - 1 and time.monotonic() < end:
            time.sleep(0.05)
        rec["skipped"] = True
        return
    transport = "auto"
    if kind == "ctor_mismatch":
        transport = "group" if rank == raiser else "shm"
    t0 = time.monotonic()
    p = None
    try:
        p, _s = _build(schedule, rank, world, timeout, Stage, transport=transport)
        rec["transport"], rec["token"] = p.transport, _token(p)
        _close(p)
    except Exception as e:  # noqa: BLE001
        rec["error"] = _err(e)
        rec["token"] = _ctor_token()
    rec["took"] = time.monotonic() - t0
    _touch(os.path.join(done, str(rank)))
    del p


def sigkill_worker(rank: int, world: int, transport: str, schedule: str, victim: int,
                   frac: float, tmpdir: str, timeout: float, in_agreement: bool = False,
                   warm: int = 2, span: int = 12, max_steps: int = 100000):
    """A training loop (step, SGD) on every rank.  After ``warm`` steps the victim arms
    a timer that kills it (SIGKILL, time written to ``tmpdir/killed_at`` first)
    ``frac * span`` of its measured step times later, so the kill lands anywhere in
    the next ``span`` steps: forwards, backwards, sends, the handshake, the end-of-step
    agreement.  ``in_agreement``: the victim dies instead as it enters the end-of-step
    agreement of step ``warm`` (the all_gather some survivors then never finish).
    Survivors run until a step raises and return its index."""
    import torch
    os.environ["DUALPIPE_TRANSPORT"] = transport
    from tests.models import Stage
    rec = {"rank": rank, "steps_ok": 0, "error": None, "failed_step": None,
           "phase": None, "transport": None, "token": None}
    p, s = _build(schedule, rank, world, timeout, Stage)
    rec["transport"], rec["token"] = p.transport, _token(p)
    opt = torch.optim.SGD(p.parameters(), lr=1e-3)
    mark = os.path.join(tmpdir, "killed_at")
    t0 = time.perf_counter()
    st, phase = 0, "step"
    try:
        for st in range(max_steps):
            if rank == victim and st == warm and in_agreement:
                _die_in_agreement(p, mark)
            elif rank == victim and st == warm:
                per_step = (time.perf_counter() - t0) / warm
                rec["kill_delay"] = frac * span * per_step
                threading.Timer(rec["kill_delay"], _die, (mark,)).start()
            opt.zero_grad(set_to_none=False)
            phase = _AT["phase"] = "step"
            _AT["step"] = st
            _step(p, s, rank, st)
            phase = _AT["phase"] = "optimizer"
            opt.step()
            rec["steps_ok"] = st + 1
    except Exception as e:  # noqa: BLE001
        rec["error"] = _err(e)
        rec["failed_step"], rec["phase"] = st, phase
    if rank == victim:
        time.sleep(60)  # the timer kills it; a victim still here is reported
        return rec
    # a survivor's record goes to a file and the process ends here: tearing down the
    # user's process group with a dead peer (and, for victim 0, without the store) costs
    # seconds per run that measure nothing
    with open(os.path.join(tmpdir, f"rank-{rank}.json"), "w") as f:
        json.dump(rec, f)
    # what a normal exit runs (the runtime's wait that keeps the store up until the
    # other live ranks have read the failure record, on the rank hosting it)
    atexit._run_exitfuncs()
    os._exit(0)


_AT = {"step": None, "phase": None}  # where the victim's loop is (read by _die)


def _die_in_agreement(p, mark: str) -> None:
    transport = p._p2p
    all_gather = transport.all_gather

    def dying(t, world, what):
        if what == "end-of-step agreement":
            _die(mark)
        return all_gather(t, world, what)
    transport.all_gather = dying


def _die(mark: str) -> None:
    with open(mark, "w") as f:
        f.write(f"{time.time()!r} {_AT['step']} {_AT['phase']}")
    os.kill(os.getpid(), signal.SIGKILL)


# =========================================================================== parent

def shm_files() -> set[str]:
    return set(glob.glob(os.path.join(SHM_DIR, "dualpipe-*")))


def _left(before: set[str], tokens: set[str], transports: list) -> list[str]:
    """Files created since ``before`` that belong to these runs (their token; other
    sessions on this host make such files too).  With no token known: none when every
    pipeline that was built says it does not use shared memory, else every new file."""
    new = shm_files() - before
    if tokens:
        new = {f for f in new if any(t in os.path.basename(f) for t in tokens)}
    elif transports and all(t is not None and t != "shm" for t in transports):
        new = set()
    return sorted(new)


def _read_time(path: str) -> float | None:
    try:
        with open(path) as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _read_where(path: str) -> tuple:
    """(step, phase) the victim's loop was in when it was killed."""
    try:
        with open(path) as f:
            _t, st, phase = f.read().split()
        return (None if st == "None" else int(st)), phase
    except (OSError, ValueError):
        return None, None


def _names(msg: str, rank: int) -> bool:
    return re.search(rf"\brank {rank}\b", msg or "") is not None


def _spawn(fn, *args, timeout: float):
    from tests.mp import run_ranks
    try:
        return run_ranks(fn, WORLD, *args, timeout=timeout, allow_errors=True)
    except TimeoutError as e:  # a rank hung: what the others returned is lost
        return [None] * WORLD, {-1: str(e)}


def _survivor(r: int, rec, t0: float | None, target: int) -> dict:
    e = (rec or {}).get("error")
    row = {"rank": r, "raised": e is not None, "type": e and e["type"],
           "failed_rank": e and e["failed_rank"],
           "named": bool(e) and _names(e["msg"], target),
           "latency": (e["t"] - t0) if (e and t0 is not None) else None,
           "pipeline_error": bool(e) and e["pipeline_error"],
           "timeout": bool(e) and e["timeout"], "msg": e and e["msg"][:400],
           "steps_ok": (rec or {}).get("steps_ok"), "missing": rec is None}
    return row


def _check_rows(label: str, rows: list[dict], target: int, bound: float,
                need_timeout: bool) -> list[str]:
    bad = []
    for w in rows:
        r = w["rank"]
        if w["missing"]:
            bad.append(f"{label}: rank {r} returned no record (see the rank errors)")
            continue
        if not w["raised"]:
            bad.append(f"{label}: rank {r} raised nothing ({w['steps_ok']} steps returned "
                       "normally)")
            continue
        want = "PipelineTimeout" if need_timeout else "PipelineError"
        if not (w["timeout"] if need_timeout else w["pipeline_error"]):
            bad.append(f"{label}: rank {r} raised {w['type']}, not a {want}: {w['msg'][:200]}")
        if w["latency"] is None:
            bad.append(f"{label}: rank {r}: no time of the fault to measure from")
        elif w["latency"] > bound:
            bad.append(f"{label}: rank {r} raised {w['latency']:.2f} s after the fault "
                       f"(promise: {bound:g} s)")
        if w["failed_rank"] != target:
            bad.append(f"{label}: rank {r}: failed_rank={w['failed_rank']!r}, "
                       f"expected {target}")
        if not w["named"]:
            bad.append(f"{label}: rank {r}: the message does not name rank {target}: "
                       f"{w['msg'][:200]}")
    return bad


def stop_case(schedule: str, victim: int, step: int = 1, forward: int = 3,
              timeout: float = STOP_TIMEOUT) -> dict:
    return dict(kind="stop", schedule=schedule, victim=victim, step=step, forward=forward,
                timeout=timeout)


def raise_case(kind: str, schedule: str, raiser: int) -> dict:
    return dict(kind=kind, schedule=schedule, raiser=raiser)


def ctor_cases(schedule: str = "dualpipev", raiser: int = 2) -> list[dict]:
    """The two constructor failures (``ctor_absent`` last: see cases_worker)."""
    return [dict(kind="ctor_mismatch", schedule=schedule, raiser=raiser),
            dict(kind="ctor_absent", schedule=schedule, raiser=raiser)]


def run_cases(transport: str, cases: list[dict]) -> dict:
    """Spawn 4 ranks that run ``cases`` (see cases_worker) on ``transport``; returns
    ``{"cases": [per-case summary], "violations": [...], "files_left": [...], ...}``."""
    tmp = tempfile.mkdtemp(prefix="dualpipe-fault-")
    before = shm_files()
    budget = 60.0 + sum(3 * c.get("timeout", RAISE_TIMEOUT) + 15 for c in cases)
    t0 = time.monotonic()
    res, errors = _spawn(cases_worker, transport, tmp, cases, timeout=budget)
    wall = time.monotonic() - t0
    tokens = {rec["token"] for recs in res if recs for rec in recs if rec.get("token")}
    left = _left(before, tokens, [rec.get("transport") for recs in res if recs
                                  for rec in recs if not rec.get("error")])
    out = {"transport": transport, "wall_s": wall, "rank_errors": errors, "cases": [],
           "violations": [], "files_left": left}
    if errors:
        out["violations"].append(f"{transport}: ranks failed outside the cases: "
                                 + "; ".join(f"rank {r}: {m[-300:]}" for r, m in errors.items()))
    for i, case in enumerate(cases):
        recs = [None if r is None else r[i] for r in res]
        summary = _summarize_case(transport, case, recs, os.path.join(tmp, f"case-{i}"))
        out["cases"].append(summary)
        out["violations"] += summary["violations"]
    if left:
        out["violations"].append(f"{transport}: files left in {SHM_DIR}: {left}")
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def _summarize_case(transport, case, recs, d) -> dict:
    kind, schedule = case["kind"], case["schedule"]
    got = [r for r in recs if r is not None]
    seen = {r["transport"] for r in got if r.get("transport")}
    s = {"kind": kind, "schedule": schedule, "transport": transport,
         "runtime_transport": sorted(seen), "violations": []}
    if kind == "stop":
        v = case["victim"]
        t0 = _read_time(os.path.join(d, "frozen_at"))
        label = f"sigstop {schedule}/{transport} victim {v}"
        rows = [_survivor(r, recs[r], t0, v) for r in range(WORLD) if r != v]
        bound = case.get("timeout", STOP_TIMEOUT) + BOUND
        s.update(victim=v, frozen=t0 is not None, survivors=rows,
                 victim_outcome=_survivor(v, recs[v], t0, v), bound_s=bound)
        if t0 is None:
            s["violations"].append(f"{label}: the victim never froze (no frozen_at)")
        s["violations"] += _check_rows(label, rows, v, bound, need_timeout=True)
    elif kind in ("no_loss", "shape"):
        r0 = case["raiser"]
        me = recs[r0] or {}
        t0 = me.get("t_raised") or me.get("t_inject")
        label = f"{kind} {schedule}/{transport} on rank {r0}"
        rows = [_survivor(r, recs[r], t0, r0) for r in range(WORLD)]
        s.update(raiser=r0, survivors=rows, t0_from="raise" if me.get("t_raised") else
                 "injection", bound_s=BOUND)
        if me.get("t_inject") is None:
            s["violations"].append(f"{label}: the fault was never injected")
        s["violations"] += _check_rows(label, rows, r0, BOUND, need_timeout=False)
    else:  # constructor failures
        r0 = case["raiser"]
        label = f"{kind} {schedule}/{transport} rank {r0}"
        rows = []
        for r in range(WORLD):
            if kind == "ctor_absent" and r == r0:
                continue
            rec = recs[r] or {}
            e = rec.get("error")
            rows.append({"rank": r, "raised": e is not None, "type": e and e["type"],
                         "took": rec.get("took"), "msg": e and e["msg"][:300],
                         "pipeline_error": bool(e) and e["pipeline_error"],
                         "timeout": bool(e) and e["timeout"],
                         "peer_timeout": bool(e) and e["peer_timeout"]})
        s.update(raiser=r0, ranks=rows)
        for w in rows:
            r = w["rank"]
            if not w["raised"]:
                s["violations"].append(f"{label}: rank {r} built the pipeline")
                continue
            if kind == "ctor_absent":
                if not w["timeout"]:
                    s["violations"].append(f"{label}: rank {r} raised {w['type']}, not a "
                                           f"PipelineTimeout: {w['msg'][:200]}")
            elif not (w["pipeline_error"] or w["type"] == "ValueError") or w["peer_timeout"]:
                # ranks asking for different transports: the documented ValueError
                # (tests/test_errors.py) or a PipelineError, never a transport's own error
                s["violations"].append(f"{label}: rank {r} raised {w['type']}: "
                                       f"{w['msg'][:200]}")
            if w["took"] is not None and w["took"] > CTOR_TIMEOUT + BOUND:
                s["violations"].append(f"{label}: rank {r} took {w['took']:.2f} s "
                                       f"(timeout {CTOR_TIMEOUT:g} s + {BOUND:g} s)")
    return s


def sigkill_plan(seed: int) -> tuple[int, float]:
    """(victim, fraction of the kill window) drawn from ``seed``."""
    rng = random.Random(seed)
    return rng.randrange(WORLD), rng.random()


def run_sigkill(transport: str, schedule: str, seed: int,
                timeout: float = KILL_TIMEOUT, in_agreement: bool = False) -> dict:
    """One SIGKILL run; returns the per-survivor numbers, the split flag and the
    violations of the promises.  ``in_agreement``: the victim (drawn from ``seed``)
    dies as it enters an end-of-step agreement (see :func:`sigkill_worker`)."""
    victim, frac = sigkill_plan(seed)
    tmp = tempfile.mkdtemp(prefix="dualpipe-fault-")
    before = shm_files()
    t0 = time.monotonic()
    res, errors = _spawn(sigkill_worker, transport, schedule, victim, frac, tmp, timeout,
                         in_agreement, timeout=3 * timeout + 90)
    wall = time.monotonic() - t0
    t_end = time.time()
    res = list(res)
    for r in range(WORLD):  # survivors leave their record in a file and exit (code 0)
        path = os.path.join(tmp, f"rank-{r}.json")
        if res[r] is None and os.path.exists(path):
            with open(path) as f:
                res[r] = json.load(f)
            if errors.get(r, "").startswith("process exited with code 0"):
                del errors[r]
    tokens = {r["token"] for r in res if r and r.get("token")}
    left = _left(before, tokens, [r.get("transport") for r in res if r])
    t_kill = _read_time(os.path.join(tmp, "killed_at"))
    out = analyze_sigkill(transport, schedule, seed, res, errors, t_kill,
                          _read_where(os.path.join(tmp, "killed_at")), left)
    shutil.rmtree(tmp, ignore_errors=True)
    out["wall_s"] = wall
    out["kill_to_end_s"] = None if t_kill is None else t_end - t_kill
    return out


def analyze_sigkill(transport: str, schedule: str, seed: int, res: list, errors: dict,
                    t_kill: float | None, where=(None, None), left=()) -> dict:
    """The numbers and violations of one SIGKILL run from the ranks' records ``res``
    (``None`` for the victim) and the time of the kill."""
    victim, frac = sigkill_plan(seed)
    kill_step, kill_phase = where
    left = list(left)
    label = f"sigkill {schedule}/{transport} seed {seed} (victim {victim})"
    rows = []
    for r in range(WORLD):
        if r == victim:
            continue
        row = _survivor(r, res[r], t_kill, victim)
        row["failed_step"] = (res[r] or {}).get("failed_step")
        row["phase"] = (res[r] or {}).get("phase")
        rows.append(row)
    steps = sorted({w["failed_step"] for w in rows if w["raised"]})
    out = {"kind": "sigkill", "schedule": schedule, "transport": transport, "seed": seed,
           "victim": victim, "frac": frac, "killed": t_kill is not None,
           "kill_step": kill_step, "kill_phase": kill_phase, "survivors": rows,
           "failed_steps": steps,
           "split": len(steps) > 1, "files_left": left,
           "runtime_transport": sorted({r["transport"] for r in res if r and r.get("transport")}),
           "rank_errors": {r: m[-300:] for r, m in errors.items()}, "violations": []}
    bad = out["violations"]
    if res[victim] is not None or t_kill is None:
        bad.append(f"{label}: the victim was not killed (its record: {res[victim]})")
    other = {r: m for r, m in errors.items() if r != victim}
    if other:
        bad.append(f"{label}: ranks failed outside the loop: {other}")
    bad += _check_rows(label, rows, victim, BOUND, need_timeout=False)
    if out["split"]:
        bad.append(f"{label}: SPLIT: survivors failed at different steps "
                   + ", ".join(f"rank {w['rank']}: step {w['failed_step']} ({w['phase']})"
                               for w in rows))
    if left:
        bad.append(f"{label}: files left in {SHM_DIR}: {left}")
    return out


def default_sigkill_seeds(n: int, need_rank0: bool = True) -> list[int]:
    """The first ``n`` seeds, swapping one in whose victim is rank 0 (the store's host)
    if none of them has it."""
    seeds = list(range(n))
    if need_rank0 and all(sigkill_plan(s)[0] != 0 for s in seeds):
        seeds[-1] = next(s for s in range(n, 1000) if sigkill_plan(s)[0] == 0)
    return seeds


def describe(summary: dict) -> str:
    """One line per case: what every survivor raised, when, and whom it blamed."""
    kind = summary["kind"]
    head = f"{kind} {summary['schedule']}/{summary['transport']}"
    if kind == "sigkill":
        head += (f" seed {summary['seed']} victim {summary['victim']} "
                 f"steps {summary['failed_steps']}{' SPLIT' if summary['split'] else ''}")
    elif "victim" in summary:
        head += f" victim {summary['victim']}"
    elif "raiser" in summary:
        head += f" rank {summary['raiser']}"
    rows = summary.get("survivors") or summary.get("ranks") or []
    parts = []
    for w in rows:
        if w.get("missing"):
            parts.append(f"r{w['rank']}: no record")
        elif not w["raised"]:
            parts.append(f"r{w['rank']}: ok")
        else:
            t = w.get("latency", w.get("took"))
            t = "?" if t is None else f"{t:.2f}s"
            fr = w.get("failed_rank", "-")
            parts.append(f"r{w['rank']}: {w['type']} {t} failed_rank={fr}"
                         + ("" if w.get("named", True) else " unnamed"))
    return head + ": " + "; ".join(parts)
