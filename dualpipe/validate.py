"""Prove a schedule complete and free of deadlock.

:func:`validate` checks, for any :class:`~dualpipe.schedules.Schedule`:

* **placement**: every action names a chunk the rank has and a micro-batch its stream has;
* **completeness**: every (stream, stage, micro-batch) has exactly one forward, exactly
  one backward (``B``, ``I`` or the backward half of ``FB``) and exactly one weight pass
  (included in ``B``; a separate ``W`` after an ``I``);
* **order**: on the rank that holds a stage, its backward comes after its forward and a
  ``W`` after its ``I``;
* **no deadlock** under in-order point-to-point communication: the lowered schedule
  (:func:`~dualpipe.schedules.lower`) is executed symbolically with asynchronous sends
  and receives that block until the sender has sent, messages on each (sender, receiver)
  channel matched first-in first-out, as an untagged transport (NCCL) matches them.
  The runtime executes exactly this model: on gloo every operation is independent; on
  NCCL messages to higher and to lower ranks travel on two separate communicators, so
  the in-order stream of each pair carries one direction only and cannot make a
  receive posted early block a send.  (Batching each compute's receives with the
  previous compute's sends, as the published implementation does, deadlocks with this
  lowering; the published code avoids that only by hand-placed special cases.)

A violation raises :class:`ScheduleError` naming the rank, the action and why, with the
rank x step grid and the failing step bracketed.
"""

from __future__ import annotations

from collections import Counter

from .schedules import (B, F, FB, I, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, Schedule,
                        lower, render_grid)

__all__ = ["ScheduleError", "validate"]


class ScheduleError(ValueError):
    """A schedule is incomplete, mis-ordered or can deadlock.  ``rank`` and ``action``
    name the first offending place (``None`` when the fault is not one action's)."""

    def __init__(self, message: str, rank: int | None = None, action: Action | None = None,
                 grid: str = ""):
        self.rank, self.action, self.grid = rank, action, grid
        super().__init__(message + (f"\n{grid}" if grid else ""))


def _fail(s_tokens, msg: str, rank: int | None = None, index: int | None = None,
          action: Action | None = None):
    grid = render_grid(s_tokens, mark=(rank, index) if rank is not None and index is not None else None)
    where = f"rank {rank}, action {index} ({action}): " if rank is not None else ""
    raise ScheduleError(where + msg, rank, action, grid)


def validate(s: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``s`` is complete, ordered and deadlock-free."""
    tokens = s.tokens()
    owner = s.stage_owner
    fwd: Counter = Counter()
    bwd: dict[tuple[int, int, int], str] = {}
    wts: Counter = Counter()
    for r, acts in enumerate(s.actions):
        if r >= len(s.placement):
            _fail(tokens, f"rank {r} has actions but no placement")
        done_f: set[tuple[int, int]] = set()
        deferred: set[tuple[int, int]] = set()
        for idx, a in enumerate(acts):
            if not a.is_compute:
                _fail(tokens, "a Schedule holds compute actions only; lower() adds communication",
                      r, idx, a)
            for kind, c, m in a.parts():
                if not 0 <= c < len(s.placement[r]):
                    _fail(tokens, f"chunk {c} does not exist on this rank "
                          f"(it has {len(s.placement[r])})", r, idx, a)
                stream, stage = s.placement[r][c]
                if not 0 <= m < s.streams[stream].num_microbatches:
                    _fail(tokens, f"micro-batch {m} out of range for stream {stream} "
                          f"({s.streams[stream].num_microbatches} micro-batches)", r, idx, a)
                key = (stream, stage, m)
                if kind == F:
                    if (c, m) in done_f:
                        _fail(tokens, f"second forward of stage {stage} micro-batch {m}", r, idx, a)
                    done_f.add((c, m))
                    fwd[key] += 1
                elif kind in (B, I):
                    if (c, m) not in done_f:
                        _fail(tokens, f"backward before its forward (stage {stage}, micro-batch {m})",
                              r, idx, a)
                    if key in bwd:
                        _fail(tokens, f"second backward of stage {stage} micro-batch {m}", r, idx, a)
                    bwd[key] = kind
                    if kind == I:
                        deferred.add((c, m))
                    else:
                        wts[key] += 1
                elif kind == W:
                    if (c, m) not in deferred:
                        _fail(tokens, f"weight pass without an earlier input-gradient pass I{c}.{m} "
                              "on this rank", r, idx, a)
                    deferred.discard((c, m))
                    wts[key] += 1
        if deferred:
            c, m = sorted(deferred)[0]
            _fail(tokens, f"rank {r}: I{c}.{m} is never followed by its W{c}.{m}", r)
    for si, st in enumerate(s.streams):
        for stage in range(st.num_stages):
            if (si, stage) not in owner:
                _fail(tokens, f"stream {si} stage {stage} is placed on no rank")
            for m in range(st.num_microbatches):
                key = (si, stage, m)
                r, c = owner[(si, stage)]
                if fwd[key] != 1:
                    _fail(tokens, f"stage {stage} of stream {si} (rank {r} chunk {c}) has "
                          f"{fwd[key]} forwards of micro-batch {m}, expected 1", r)
                if key not in bwd:
                    _fail(tokens, f"stage {stage} of stream {si} (rank {r} chunk {c}) has no "
                          f"backward of micro-batch {m}", r)
                if wts[key] != 1:
                    _fail(tokens, f"stage {stage} of stream {si} (rank {r} chunk {c}) has "
                          f"{wts[key]} weight passes of micro-batch {m}, expected 1", r)
    _check_deadlock(s)


def _check_deadlock(s: Schedule) -> None:
    low = lower(s)
    tokens = [[str(a) for a in acts] for acts in low]
    P = s.num_ranks
    owner = s.stage_owner
    chan: dict[tuple[int, int], list[tuple[str, int, int]]] = {}
    got: dict[tuple[int, int], int] = {}
    have = [set() for _ in range(P)]  # (F|B, chunk, mb) inputs available on the rank
    pos = [0] * P

    def needs(r: int, kind: str, c: int, m: int):
        stream, stage = s.placement[r][c]
        if kind == F and stage > 0:
            return (F, c, m)
        if kind in (B, I) and stage + 1 < s.streams[stream].num_stages:
            return (B, c, m)
        return None

    def produce_local(r: int, kind: str, c: int, m: int):
        stream, stage = s.placement[r][c]
        if kind == F and stage + 1 < s.streams[stream].num_stages:
            nr, nc = owner[(stream, stage + 1)]
            if nr == r:
                have[r].add((F, nc, m))
        elif kind in (B, I) and stage > 0:
            pr, pc = owner[(stream, stage - 1)]
            if pr == r:
                have[r].add((B, pc, m))

    progress = True
    while progress:
        progress = False
        for r in range(P):
            acts = low[r]
            while pos[r] < len(acts):
                a = acts[pos[r]]
                if a.kind in (SEND_F, SEND_B):
                    stream, stage = s.placement[r][a.chunk]
                    nr, nc = owner[(stream, stage + (1 if a.kind == SEND_F else -1))]
                    chan.setdefault((r, a.peer), []).append(
                        (F if a.kind == SEND_F else B, nc, a.mb))
                elif a.kind in (RECV_F, RECV_B):
                    q = chan.get((a.peer, r), [])
                    k = got.get((a.peer, r), 0)
                    if k >= len(q):
                        break
                    msg = q[k]
                    want = (F if a.kind == RECV_F else B, a.chunk, a.mb)
                    if msg != want:
                        _fail(tokens, f"channel order mismatch: message {k} from rank {a.peer} is "
                              f"{msg[0]}{msg[1]}.{msg[2]} but this rank expects "
                              f"{want[0]}{want[1]}.{want[2]}", r, pos[r], a)
                    got[(a.peer, r)] = k + 1
                    have[r].add(want)
                else:
                    missing = [n for kind, c, m in a.parts()
                               if (n := needs(r, kind, c, m)) is not None and n not in have[r]]
                    if missing:
                        break
                    for kind, c, m in a.parts():
                        n = needs(r, kind, c, m)
                        if n is not None:
                            have[r].discard(n)
                        produce_local(r, kind, c, m)
                pos[r] += 1
                progress = True
    stuck = [r for r in range(P) if pos[r] < len(low[r])]
    if stuck:
        lines = []
        for r in stuck:
            a = low[r][pos[r]]
            if a.kind in (RECV_F, RECV_B):
                why = f"waits for rank {a.peer} to send {'activation' if a.kind == RECV_F else 'gradient'} {a.chunk}.{a.mb}"
            else:
                why = "waits for an input this rank never receives or computes first"
            lines.append(f"rank {r} at action {pos[r]} ({a}) {why}")
        r0 = stuck[0]
        _fail(tokens, "deadlock: " + "; ".join(lines), r0, pos[r0], low[r0][pos[r0]])
