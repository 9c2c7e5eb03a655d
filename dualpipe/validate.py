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

from collections import Counter, deque

from .schedules import (B, F, FB, I, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, Schedule,
                        gc_paused, lower, render_grid)

__all__ = ["ScheduleError", "validate"]


class ScheduleError(ValueError):
    """A schedule is incomplete, mis-ordered or can deadlock.  ``rank`` and ``action``
    name the first offending place (``None`` when the fault is not one action's)."""

    def __init__(self, message: str, rank: int | None = None, action: Action | None = None,
                 grid: str = ""):
        self.rank, self.action, self.grid = rank, action, grid
        super().__init__(message + (f"\n{grid}" if grid else ""))


def _fail(actions, msg: str, rank: int | None = None, index: int | None = None,
          action: Action | None = None):
    """Raise :class:`ScheduleError`; ``actions`` are the per-rank lists ``index``
    points into (rendered only now: the grid is for the failure message)."""
    tokens = [[str(a) for a in acts] for acts in actions]
    grid = render_grid(tokens, mark=(rank, index) if rank is not None and index is not None else None)
    where = f"rank {rank}, action {index} ({action}): " if rank is not None else ""
    raise ScheduleError(where + msg, rank, action, grid)


class _Tally:
    """What ran for each micro-batch of one (stream, stage): forwards, the backward's
    kind (``B`` or ``I``; ``None`` before it runs) and weight passes."""

    __slots__ = ("fwd", "bwd", "wts")

    def __init__(self, num_microbatches: int):
        self.fwd = [0] * num_microbatches
        self.bwd: list[str | None] = [None] * num_microbatches
        self.wts = [0] * num_microbatches


@gc_paused()
def validate(s: Schedule) -> None:
    """Raise :class:`ScheduleError` unless ``s`` is complete, ordered and deadlock-free.

    Linear in the number of actions: each is looked at a bounded number of times."""
    acts_of = s.actions
    owner = s.stage_owner
    tallies: dict[tuple[int, int], _Tally] = {}
    for r, acts in enumerate(s.actions):
        if r >= len(s.placement):
            _fail(acts_of, f"rank {r} has actions but no placement")
        chunks = s.placement[r]
        nmb = [s.streams[stream].num_microbatches for stream, _ in chunks]
        tally = [tallies.setdefault(key, _Tally(n)) for key, n in zip(chunks, nmb)]
        done_f = [bytearray(n) for n in nmb]      # this rank ran F of (chunk, mb)
        deferred = [bytearray(n) for n in nmb]    # ... an I of (chunk, mb), no W yet
        pending_w = 0
        for idx, a in enumerate(acts):
            if not a.is_compute:
                _fail(acts_of, "a Schedule holds compute actions only; lower() adds communication",
                      r, idx, a)
            for kind, c, m in a.parts():
                if not 0 <= c < len(chunks):
                    _fail(acts_of, f"chunk {c} does not exist on this rank "
                          f"(it has {len(chunks)})", r, idx, a)
                stream, stage = chunks[c]
                if not 0 <= m < nmb[c]:
                    _fail(acts_of, f"micro-batch {m} out of range for stream {stream} "
                          f"({nmb[c]} micro-batches)", r, idx, a)
                tl = tally[c]
                if kind == F:
                    if done_f[c][m]:
                        _fail(acts_of, f"second forward of stage {stage} micro-batch {m}", r, idx, a)
                    done_f[c][m] = 1
                    tl.fwd[m] += 1
                elif kind in (B, I):
                    if not done_f[c][m]:
                        _fail(acts_of, f"backward before its forward (stage {stage}, micro-batch {m})",
                              r, idx, a)
                    if tl.bwd[m] is not None:
                        _fail(acts_of, f"second backward of stage {stage} micro-batch {m}", r, idx, a)
                    tl.bwd[m] = kind
                    if kind == I:
                        deferred[c][m] = 1
                        pending_w += 1
                    else:
                        tl.wts[m] += 1
                elif kind == W:
                    if not deferred[c][m]:
                        _fail(acts_of, f"weight pass without an earlier input-gradient pass I{c}.{m} "
                              "on this rank", r, idx, a)
                    deferred[c][m] = 0
                    pending_w -= 1
                    tl.wts[m] += 1
        if pending_w:
            c = next(c for c, d in enumerate(deferred) if any(d))
            m = deferred[c].index(1)
            _fail(acts_of, f"rank {r}: I{c}.{m} is never followed by its W{c}.{m}", r)
    for si, st in enumerate(s.streams):
        for stage in range(st.num_stages):
            if (si, stage) not in owner:
                _fail(acts_of, f"stream {si} stage {stage} is placed on no rank")
            r, c = owner[(si, stage)]
            tl = tallies.get((si, stage)) or _Tally(st.num_microbatches)  # no actions at all
            for m in range(st.num_microbatches):
                if tl.fwd[m] != 1:
                    _fail(acts_of, f"stage {stage} of stream {si} (rank {r} chunk {c}) has "
                          f"{tl.fwd[m]} forwards of micro-batch {m}, expected 1", r)
                if tl.bwd[m] is None:
                    _fail(acts_of, f"stage {stage} of stream {si} (rank {r} chunk {c}) has no "
                          f"backward of micro-batch {m}", r)
                if tl.wts[m] != 1:
                    _fail(acts_of, f"stage {stage} of stream {si} (rank {r} chunk {c}) has "
                          f"{tl.wts[m]} weight passes of micro-batch {m}, expected 1", r)
    _check_deadlock(s)


def _check_deadlock(s: Schedule) -> None:
    """Dry-run the lowered schedule.

    Each rank runs its actions in order until it reaches a receive whose message has
    not been sent yet (it then waits for that sender) or a compute whose input it has
    neither received nor produced (it can never run: nothing but this rank's own
    actions supplies its inputs).  A send wakes its receiver if that one waits, so
    every action runs once and every wait is resumed at most once per message sent:
    the work is linear in the lowered schedule's length.  Whether every rank
    finishes, and where each one stops if not, does not depend on the order the ranks
    run in (a rank's progress depends only on the messages on its channels), so this
    worklist order proves what a lock-step one would.
    """
    low = lower(s)
    P = s.num_ranks
    links = s.neighbours
    chan: dict[tuple[int, int], deque[tuple[str, int, int]]] = {}  # (src, dst) -> in flight
    got: dict[tuple[int, int], int] = {}                             # (src, dst) -> received
    have = [set() for _ in range(P)]  # (F|B, chunk, mb) inputs available on the rank
    pos = [0] * P
    waiting_for = [-1] * P            # the sender a rank waits on, -1 when it does not

    def needs(r: int, kind: str, c: int, m: int):
        prev, nxt = links[r][c]
        if kind == F and prev is not None:
            return (F, c, m)
        if kind in (B, I) and nxt is not None:
            return (B, c, m)
        return None

    def produce_local(r: int, kind: str, c: int, m: int):
        prev, nxt = links[r][c]
        if kind == F and nxt is not None and nxt[0] == r:
            have[r].add((F, nxt[1], m))
        elif kind in (B, I) and prev is not None and prev[0] == r:
            have[r].add((B, prev[1], m))

    runnable = deque(range(P))
    while runnable:
        r = runnable.popleft()
        acts = low[r]
        while pos[r] < len(acts):
            a = acts[pos[r]]
            if a.kind in (SEND_F, SEND_B):
                prev, nxt = links[r][a.chunk]
                nc = (nxt if a.kind == SEND_F else prev)[1]
                chan.setdefault((r, a.peer), deque()).append((F if a.kind == SEND_F else B, nc, a.mb))
                if waiting_for[a.peer] == r:
                    waiting_for[a.peer] = -1
                    runnable.append(a.peer)
            elif a.kind in (RECV_F, RECV_B):
                q = chan.get((a.peer, r))
                if not q:
                    waiting_for[r] = a.peer
                    break
                msg = q.popleft()
                k = got.get((a.peer, r), 0)
                want = (F if a.kind == RECV_F else B, a.chunk, a.mb)
                if msg != want:
                    _fail(low, f"channel order mismatch: message {k} from rank {a.peer} is "
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
        _fail(low, "deadlock: " + "; ".join(lines), r0, pos[r0], low[r0][pos[r0]])
