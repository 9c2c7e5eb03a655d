"""The plan: one rank's step compiled once per (schedule, ranks, chunks, mode).

:func:`compile_plans` turns a :class:`~dualpipe.schedules.Schedule` (its lowered action
lists, :func:`~dualpipe.schedules.lower`) into one :class:`Plan` per rank: the compute
steps in schedule order, each a :class:`Step` naming the receives it waits for, the
sends it posts and how far receives may be posted ahead of it; the receives in posting
order (:class:`Recv`); and, per receive, the sends whose buffers are provably free once
it has arrived (``Plan.release``, see :func:`compile_plans`).  The executor
(:mod:`dualpipe.runtime.executor`) walks a plan; nothing here touches torch.

The cache key is ``(schedule, forward_only, lookahead)``: a :class:`Schedule` hashes and
compares by (name, ranks, chunks), so equal schedules share their plans.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

from ..schedules import (B, F, FB, I, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, Schedule,
                         gc_paused, lower)

__all__ = ["Send", "Recv", "Step", "Plan", "compile_plans"]


class Send(NamedTuple):
    """A send posted right after the step that produced it: ``kind`` F (an
    activation) or B (a gradient), of micro-batch ``mb`` of this rank's ``chunk``, to
    pipeline rank ``peer``; ``sid`` numbers the rank's sends in plan order."""

    kind: str
    chunk: int
    mb: int
    peer: int
    sid: int


class Recv(NamedTuple):
    """A receive, in posting order: ``kind`` F (the input activation of micro-batch
    ``mb`` of this rank's ``chunk``) or B (the gradient of its output), from ``peer``."""

    kind: str
    chunk: int
    mb: int
    peer: int


class Step(NamedTuple):
    """One compute action of a rank's plan.

    ``action``: the schedule's compute :class:`~dualpipe.schedules.Action` (an F&B pair
    is an F in forward-only mode); ``need``: indices into :attr:`Plan.recvs` that it
    waits for before it runs; ``sends``: the :class:`Send` s it posts; ``post_upto``:
    receives with an index below it may be posted before it runs (``lookahead`` compute
    steps ahead, and always every receive it needs); ``text``: ``str(action)``, the name
    used in errors and the timeline."""

    action: Action
    need: tuple[int, ...]
    sends: tuple[Send, ...]
    post_upto: int
    text: str


@dataclass
class Plan:
    """One rank's compiled step: compute steps, receives in posting order, and for each
    receive the send ids that are provably complete once it has arrived."""

    steps: list[Step] = field(default_factory=list)
    recvs: list[Recv] = field(default_factory=list)
    release: list[tuple[int, ...]] = field(default_factory=list)  # per receive: send ids


def _compile_rank(s: Schedule, rank: int, forward_only: bool, lookahead: int) -> Plan:
    low = lower(s)[rank]
    plan = Plan()
    recv_index: dict[tuple, int] = {}
    raw = []  # (compute action, its sends, receives before it)
    nsend = 0
    for a in low:
        if forward_only and a.kind in (RECV_B, SEND_B, B, I, W):
            continue
        if a.kind in (RECV_F, RECV_B):
            key = (F if a.kind == RECV_F else B, a.chunk, a.mb)
            recv_index[key] = len(plan.recvs)
            plan.recvs.append(Recv(key[0], a.chunk, a.mb, a.peer))
        elif a.kind in (SEND_F, SEND_B):
            raw[-1][1].append(Send(F if a.kind == SEND_F else B, a.chunk, a.mb, a.peer, nsend))
            nsend += 1
        else:
            if forward_only and a.kind == FB:
                a = Action(F, a.chunk, a.mb)
            raw.append((a, [], len(plan.recvs)))
    for i, (a, sends, nrecv_before) in enumerate(raw):
        need = tuple(recv_index[(F if k == F else B, c, m)] for k, c, m in a.parts()
                     if k != W and (F if k == F else B, c, m) in recv_index)
        j = min(i + lookahead, len(raw) - 1)
        post_upto = raw[j][2] if j > i else nrecv_before
        post_upto = max(post_upto, max(need) + 1 if need else 0)
        plan.steps.append(Step(a, need, tuple(sends), post_upto, str(a)))
    plan.release = [() for _ in plan.recvs]
    return plan


@lru_cache(maxsize=32)
@gc_paused()
def compile_plans(s: Schedule, forward_only: bool, lookahead: int) -> tuple[Plan, ...]:
    """Every rank's plan, with release points for sends.

    A send's buffer may be released once the transfer is complete, but gloo reports
    a send complete only when it is waited for, and waiting early could block on a
    receiver that has not posted the receive yet.  Every rank knows every rank's plan,
    so for the k-th message from r to X we find the first message X sends back to r
    at or after the step on X that consumed message k: once r has received that one,
    X had received message k, and r's wait on the send returns at once.  Sends with
    no such message are reaped at the end of the step.  (Cached; ``__wrapped__`` is
    the uncached pass.)"""
    plans = [_compile_rank(s, r, forward_only, lookahead) for r in range(s.num_ranks)]
    # per rank: the receive indices from each peer, in channel order, and consumers
    recv_seq = []
    consumer = []
    for plan in plans:
        by_peer: dict[int, list[int]] = {}
        for j, recv in enumerate(plan.recvs):
            by_peer.setdefault(recv.peer, []).append(j)
        recv_seq.append(by_peer)
        cons = [0] * len(plan.recvs)
        for i, step in enumerate(plan.steps):
            for j in step.need:
                cons[j] = i
        consumer.append(cons)
    # per rank: for each peer, the step index of every send to it, in order
    send_steps = []
    for plan in plans:
        by_peer = {}
        for i, step in enumerate(plan.steps):
            for snd in step.sends:
                by_peer.setdefault(snd.peer, []).append(i)
        send_steps.append(by_peer)
    for r, plan in enumerate(plans):
        release: list[list[int]] = [[] for _ in plan.recvs]
        sent_to: dict[int, int] = {}
        for step in plan.steps:
            for snd in step.sends:
                x = snd.peer
                k = sent_to.get(x, 0)
                sent_to[x] = k + 1
                jx = recv_seq[x][r][k]           # X's receive of this message
                c = consumer[x][jx]              # X's step that consumed it
                back_steps = send_steps[x].get(r, [])
                back = bisect_left(back_steps, c)  # messages X sent to r before step c
                if back < len(back_steps):       # X sends r one more at or after step c
                    release[recv_seq[r][x][back]].append(snd.sid)
        plan.release = [tuple(x) for x in release]
    return tuple(plans)
