"""Properties of the runtime's plan compiler (:mod:`dualpipe.runtime.plan`), for every
registered schedule on small rank and micro-batch counts, training and forward-only.

(Not the planner: that is tests/test_plan.py.)  Each property is checked against the
schedule itself (its actions, placement and neighbours), not against the compiler's
own intermediate data:

* a rank's compute steps are its schedule actions, in order;
* every receive is consumed by exactly one step, which waits for it, and it is posted
  no later than that step starts;
* the sends on rank r to peer x and the receives on x from r pair up one to one, in
  order, with the same kind (so the same tag) and micro-batch;
* a send's buffer is reaped early only at a receive from its peer that the peer sent
  at or after the step that consumed the send (so the send had arrived), at the
  earliest such receive; every other send is reaped at the end of the step;
* plans are compiled once per (schedule, mode, lookahead), and once per pipeline and
  (chunks, mode).
"""
from __future__ import annotations

import types

import pytest

from dualpipe.runtime import pipeline as rt_pipeline
from dualpipe.runtime.plan import Plan, Recv, Send, Step, compile_plans
from dualpipe.schedules import (B, F, FB, I, RECV_B, RECV_F, REGISTRY, SCHEDULES, SEND_B, W,
                                Action, lower)


def _cases():
    out = []
    for name in sorted(REGISTRY):
        spec = REGISTRY[name]
        for ranks in (1, 2, 3, 4):
            if not spec.supports(ranks):
                continue
            n = spec.min_chunks(ranks)
            for chunks in sorted({n, n + 2, 2 * n}):
                out.append((name, ranks, chunks))
    return out


CASES = _cases()
MODES = [pytest.param(False, id="train"), pytest.param(True, id="forward-only")]


def _schedule(name, ranks, chunks):
    try:
        return SCHEDULES[name](ranks, chunks)
    except ValueError as e:  # a chunk count the generator refuses is not a plan case
        pytest.skip(f"{name} {ranks}x{chunks}: {e}")


def _expected_actions(actions, forward_only):
    if not forward_only:
        return list(actions)
    return [Action(F, a.chunk, a.mb) if a.kind == FB else a
            for a in actions if a.kind in (F, FB)]


def _recvs_before(s, r, forward_only):
    """Per compute step of rank r: how many receives lower() places before it."""
    out, n = [], 0
    for a in lower(s)[r]:
        if forward_only and a.kind in (RECV_B, SEND_B, B, I, W):
            continue
        if a.kind in (RECV_F, RECV_B):
            n += 1
        elif a.is_compute:
            out.append(n)
    return out


def _recv_source(s, r, kind, c):
    """The rank a part (kind, chunk c of rank r) receives its input from, or None when
    the producer is local or absent."""
    prev, nxt = s.neighbours[r][c]
    src = prev if kind == F else nxt
    return None if src is None or src[0] == r else src[0]


def test_cases_cover_every_registered_schedule():
    assert {c[0] for c in CASES} == set(REGISTRY)
    assert len(CASES) >= 2 * len(REGISTRY)


@pytest.mark.parametrize("forward_only", MODES)
@pytest.mark.parametrize("name,ranks,chunks", CASES)
@pytest.mark.parametrize("lookahead", [1, 2, 5])
def test_plan_properties(name, ranks, chunks, forward_only, lookahead):
    s = _schedule(name, ranks, chunks)
    plans = compile_plans(s, forward_only, lookahead)
    assert len(plans) == ranks and all(isinstance(p, Plan) for p in plans)
    for r, plan in enumerate(plans):
        where = f"{name} {ranks}x{chunks} rank {r}"
        assert all(isinstance(st, Step) for st in plan.steps)
        assert all(isinstance(rc, Recv) for rc in plan.recvs)
        # 1. the compute steps are the schedule's actions, in order
        assert [st.action for st in plan.steps] == _expected_actions(s.actions[r],
                                                                     forward_only), where
        assert [st.text for st in plan.steps] == [str(st.action) for st in plan.steps]
        # 2. each receive is waited for by exactly one step, the one whose part consumes
        #    it, and is posted no later than that step starts
        consumers: dict[int, int] = {}
        for i, st in enumerate(plan.steps):
            wanted = []
            for kind, c, m in st.action.parts():
                if kind == W or (forward_only and kind != F):
                    continue
                k = F if kind == F else B
                if _recv_source(s, r, k, c) is not None:
                    wanted.append((k, c, m))
            assert sorted((plan.recvs[j].kind, plan.recvs[j].chunk, plan.recvs[j].mb)
                          for j in st.need) == sorted(wanted), f"{where} step {st.text}"
            for j in st.need:
                assert j not in consumers, f"{where}: receive {plan.recvs[j]} waited twice"
                consumers[j] = i
                assert j < st.post_upto, f"{where}: {plan.recvs[j]} posted after {st.text}"
                assert plan.recvs[j].peer == _recv_source(s, r, plan.recvs[j].kind,
                                                          plan.recvs[j].chunk)
        assert sorted(consumers) == list(range(len(plan.recvs))), \
            f"{where}: a receive nobody waits for"
        ups = [st.post_upto for st in plan.steps]
        assert ups == sorted(ups) and all(0 <= u <= len(plan.recvs) for u in ups), where
        # posting ahead: by step i, every receive lower() places before it is posted,
        # and none that lower() places after the compute `lookahead` steps later
        before = _recvs_before(s, r, forward_only)
        last = len(plan.steps) - 1
        for i, st in enumerate(plan.steps):
            assert before[i] <= st.post_upto <= before[min(i + lookahead, last)], \
                f"{where} step {st.text}"
        # 3. a step's sends are what its parts produce for another rank
        sids = []
        for st in plan.steps:
            want = []
            for kind, c, m in st.action.parts():
                if kind == W or (forward_only and kind != F):
                    continue
                prev, nxt = s.neighbours[r][c]
                dst = nxt if kind == F else prev
                if dst is not None and dst[0] != r:
                    want.append((F if kind == F else B, c, m, dst[0]))
            assert all(isinstance(x, Send) for x in st.sends)
            assert sorted((x.kind, x.chunk, x.mb, x.peer) for x in st.sends) == sorted(want), \
                f"{where} step {st.text}"
            sids += [x.sid for x in st.sends]
        assert sids == list(range(len(sids))), f"{where}: send ids not in plan order"
    _check_channels(s, plans, forward_only)
    _check_release(s, plans)


def _check_channels(s, plans, forward_only):
    """Sends r -> x and receives on x from r pair up in order (same kind: same tag)."""
    for r, plan in enumerate(plans):
        for x in range(s.num_ranks):
            sent = [snd for st in plan.steps for snd in st.sends if snd.peer == x]
            got = [rc for rc in plans[x].recvs if rc.peer == r]
            assert len(sent) == len(got), f"{s.name}: channel {r}->{x}"
            for snd, rc in zip(sent, got):
                prev, nxt = s.neighbours[r][snd.chunk]
                dst = nxt if snd.kind == F else prev
                assert (snd.kind, snd.mb) == (rc.kind, rc.mb), f"{s.name}: {r}->{x} {snd} {rc}"
                assert dst == (x, rc.chunk), f"{s.name}: {snd} lands on chunk {rc.chunk}"


def _check_release(s, plans):
    """The reaping proof: send k on r -> x is reaped at receive j on r (from x) only when
    x sent j's message at or after the step that consumed message k, the first such."""
    consumer = []  # per rank: receive index -> consuming step
    for plan in plans:
        cons = {}
        for i, st in enumerate(plan.steps):
            for j in st.need:
                cons[j] = i
        consumer.append(cons)
    for r, plan in enumerate(plans):
        assert len(plan.release) == len(plan.recvs)
        released = [sid for rel in plan.release for sid in rel]
        assert len(released) == len(set(released)), f"{s.name} rank {r}: reaped twice"
        at = {sid: j for j, rel in enumerate(plan.release) for sid in rel}
        for x in range(s.num_ranks):
            sent = [snd for st in plan.steps for snd in st.sends if snd.peer == x]
            x_recvs = [j for j, rc in enumerate(plans[x].recvs) if rc.peer == r]
            # the steps of x that send to r, in order, and r's receives of them
            back_steps = [i for i, st in enumerate(plans[x].steps)
                          for snd in st.sends if snd.peer == r]
            r_recvs = [j for j, rc in enumerate(plan.recvs) if rc.peer == x]
            for k, snd in enumerate(sent):
                consumed = consumer[x][x_recvs[k]]
                later = [n for n, step in enumerate(back_steps) if step >= consumed]
                if not later:
                    assert snd.sid not in at, f"{s.name} rank {r}: {snd} reaped unproven"
                    continue
                assert at.get(snd.sid) == r_recvs[later[0]], \
                    f"{s.name} rank {r}: {snd} reaped at the wrong receive"
                assert plan.recvs[at[snd.sid]].peer == x



@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_plans_are_compiled_once_per_key(name):
    spec = REGISTRY[name]
    ranks = next(r for r in (2, 4, 1) if spec.supports(r))
    n = spec.min_chunks(ranks)
    s = SCHEDULES[name](ranks, n)
    first = compile_plans(s, False, 2)
    assert compile_plans(s, False, 2) is first
    # an equal schedule built anew (hash and equality by content) shares the plans
    assert compile_plans(SCHEDULES[name](ranks, n), False, 2) is first
    assert compile_plans(s, True, 2) is not first
    assert compile_plans(s, False, 3) is not first


def test_a_pipeline_compiles_once_per_chunks_and_mode(monkeypatch):
    calls = []

    def counting(s, forward_only, lookahead):
        calls.append((s.num_chunks, forward_only, lookahead))
        return compile_plans(s, forward_only, lookahead)
    # PipelineRuntime._plan looks the compiler up in its own module
    monkeypatch.setattr(rt_pipeline, "compile_plans", counting)
    pipe = types.SimpleNamespace(_plans={}, lookahead=2, rank=1)
    s4, s8 = SCHEDULES["dualpipev"](2, 4), SCHEDULES["dualpipev"](2, 8)
    plan = rt_pipeline.PipelineRuntime._plan(pipe, s4, False)
    assert plan is compile_plans(s4, False, 2)[1]
    assert rt_pipeline.PipelineRuntime._plan(pipe, s4, False) is plan
    rt_pipeline.PipelineRuntime._plan(pipe, s4, True)
    rt_pipeline.PipelineRuntime._plan(pipe, s8, False)
    rt_pipeline.PipelineRuntime._plan(pipe, s8, False)
    assert calls == [(4, False, 2), (4, True, 2), (8, False, 2)]


def test_steps_are_typed_records():
    s = SCHEDULES["dualpipev"](2, 4)
    st = next(st for st in compile_plans(s, False, 2)[0].steps if st.sends)
    assert st.action.is_compute and st.text == str(st.action)
    assert st.sends[0].peer == 1 and isinstance(st.sends[0].sid, int)
    assert I in {st.action.kind for p in compile_plans(SCHEDULES["zb1p"](2, 2), False, 2)
                 for st in p.steps}
