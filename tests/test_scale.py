"""The schedule tools stay linear, and the validator still rejects every kind of broken
schedule with the same kind of message.

Speed is measured in ``bench.scale``, never asserted here.  What is asserted is work
counted without a clock: the Python lines the tools execute per action (``sys.settrace``)
at a small and a ~30x larger schedule, how often validate and simulate touch each
action, and that cached lookups do not walk the actions.  A loop over the whole plan
inside a loop over its actions (the runtime's plan compiler had one) multiplies the
lines per action by the size ratio; work done inside one C call (slicing, hashing a big
tuple) is invisible to these counts, which is why the lookups are checked separately
and the benchmark records the times.
"""
from __future__ import annotations

import os
import sys

import pytest

import dualpipe
from dualpipe import schedules as sch
from dualpipe.schedules import (B, F, I, SCHEDULES, W, Action, Schedule, get_schedule,
                                lower, spec_of)
from dualpipe.simulate import simulate
from dualpipe.validate import ScheduleError, validate

PKG_DIR = os.path.dirname(dualpipe.__file__)
# the schedules of a pipeline (fb-only runs on one rank: it has no growth in ranks)
NAMES = sorted(n for n in SCHEDULES if spec_of(n).supports(4))
SMALL, LARGE = (4, 16), (16, 128)


# ----------------------------------------------------------------------------- work counts

def _lines(fn, *args) -> int:
    """Lines executed inside the ``dualpipe`` package while ``fn(*args)`` runs."""
    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code.co_filename.startswith(PKG_DIR) else None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        fn(*args)
    finally:
        sys.settrace(old)
    return count


def _tools():
    from dualpipe.runtime.plan import compile_plans as cached_plans
    compile_plans = cached_plans.__wrapped__  # the uncached pass
    return {
        "generate": lambda name, s: SCHEDULES[name](s.num_ranks, s.num_chunks),
        "lower": lambda name, s: sch._lower(s),
        "validate": lambda name, s: validate(s),
        "simulate": lambda name, s: simulate(s),
        "plan": lambda name, s: compile_plans(s, False, 2),
    }


@pytest.mark.parametrize("name", NAMES)
def test_lines_per_action_do_not_grow(name):
    """Per lowered action (compute and communication), no tool executes more Python
    lines on a 16 x 128 schedule than on a 4 x 16 one (+10 %); a quadratic loop would
    multiply them by the ~30x size ratio."""
    per_action = {}
    for size in (SMALL, LARGE):
        s = SCHEDULES[name](*size)
        n = sum(len(a) for a in lower(s))
        per_action[size] = {tool: _lines(fn, name, s) / n for tool, fn in _tools().items()}
    ratio_of_sizes = (sum(len(a) for a in lower(SCHEDULES[name](*LARGE)))
                      / sum(len(a) for a in lower(SCHEDULES[name](*SMALL))))
    assert ratio_of_sizes > 20, "the two sizes must differ enough to expose a quadratic loop"
    for tool in per_action[SMALL]:
        small, large = per_action[SMALL][tool], per_action[LARGE][tool]
        assert large <= 1.1 * small, (
            f"{name} {tool}: {large:.1f} lines per action at {LARGE} vs {small:.1f} at "
            f"{SMALL}: work per action grows with the schedule")


def _parts_calls(monkeypatch, fn, *args) -> int:
    calls = 0
    orig = Action.parts

    def parts(self):
        nonlocal calls
        calls += 1
        return orig(self)
    with monkeypatch.context() as m:
        m.setattr(Action, "parts", parts)
        fn(*args)
    return calls


@pytest.mark.parametrize("name", NAMES)
def test_each_action_is_touched_a_bounded_number_of_times(name, monkeypatch):
    """validate reads each action's parts 3 times (completeness, then the dry run
    checks its inputs and consumes them), however large the schedule; simulate at most
    4 (tried at most twice, its outputs written once, activations counted once)."""
    for size in (SMALL, LARGE):
        s = SCHEDULES[name](*size)
        lower(s)
        n = sum(len(a) for a in s.actions)
        assert _parts_calls(monkeypatch, validate, s) == 3 * n
        assert _parts_calls(monkeypatch, simulate, s) <= 4 * n


class _Untouchable(Action):
    """An action that fails the test if anything hashes or compares it."""

    __slots__ = ()

    def __hash__(self):
        raise AssertionError("a schedule's actions were hashed")

    def __eq__(self, other):
        raise AssertionError("a schedule's actions were compared")


def test_cached_lookups_do_not_walk_the_actions(monkeypatch):
    s = get_schedule("dualpipe", 8, 32)
    poisoned = Schedule(s.name, s.num_ranks, s.num_chunks, s.streams, s.placement,
                        ((_Untouchable(F, 0, 0),) + s.actions[0][1:],) + s.actions[1:])
    hash(poisoned)
    assert {poisoned: 1}[poisoned] == 1          # cache keys: identity, O(1) hash
    calls = []
    monkeypatch.setattr(sch, "_lower", lambda x: calls.append(x) or ((),) * x.num_ranks)
    fresh = SCHEDULES["zb1p"](4, 8)
    first = lower(fresh)
    assert lower(fresh) is first and lower(fresh) is first
    assert calls == [fresh], "lower() must run its pass once per schedule object"
    # get_schedule hands out one object per (name, ranks, chunks), lowered once
    assert get_schedule("1f1b", 4, 8) is get_schedule("1f1b", 4, 8)


def test_gc_paused_restores_the_collector():
    import gc
    assert gc.isenabled()
    with sch.gc_paused():
        assert not gc.isenabled()
        with sch.gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled(), "an inner pause must not re-enable the outer one's"
    assert gc.isenabled()
    with pytest.raises(ScheduleError):
        validate(_with_rank(SCHEDULES["1f1b"](2, 2), 0, []))
    assert gc.isenabled(), "a failing validate() must restore the collector"


# ----------------------------------------------------------------------------- mutations

def _with_rank(s: Schedule, rank: int, acts) -> Schedule:
    actions = list(s.actions)
    actions[rank] = tuple(acts)
    return Schedule(s.name, s.num_ranks, s.num_chunks, s.streams, s.placement, tuple(actions))


def _index(acts, pred) -> int:
    return next(i for i, a in enumerate(acts) if pred(a))


def _has(a, kinds, c, m) -> bool:
    return any(k in kinds and (c, m) == (pc, pm) for k, pc, pm in a.parts())


def _rejected(bad: Schedule, match: str) -> ScheduleError:
    with pytest.raises(ScheduleError, match=match) as e:
        validate(bad)
    return e.value


def _marked(e: ScheduleError, index: int | None = None) -> None:
    """The grid's row of the failing rank brackets the failing action."""
    assert e.rank is not None and e.action is not None
    row = next(line for line in e.grid.splitlines() if line.startswith(f"rank {e.rank:>2}:"))
    assert f"[{e.action}]" in row, f"failing step not marked on rank {e.rank}:\n{e.grid}"
    assert e.grid.count("[") == 1, "exactly one step is marked"
    if index is not None:
        assert str(e).startswith(f"rank {e.rank}, action {index} ({e.action}): ")


@pytest.mark.parametrize("name", NAMES)
def test_dropped_forward(name):
    s = SCHEDULES[name](4, 16)
    acts = list(s.actions[0])
    assert str(acts[0]) == "F0.0"
    del acts[0]
    e = _rejected(_with_rank(s, 0, acts), r"backward before its forward \(stage 0, micro-batch 0\)")
    _marked(e, _index(acts, lambda a: _has(a, (B, I), 0, 0)))


@pytest.mark.parametrize("name", NAMES)
def test_dropped_backward(name):
    s = SCHEDULES[name](4, 16)
    acts = list(s.actions[0])
    idx = max(i for i, a in enumerate(acts) if a.kind in (B, I))
    kind, c, m = acts[idx].parts()[0]
    del acts[idx]
    if kind == I:   # its W remains, without the input-gradient pass
        e = _rejected(_with_rank(s, 0, acts), f"weight pass without an earlier input-gradient "
                      f"pass I{c}.{m}")
        _marked(e)
    else:
        e = _rejected(_with_rank(s, 0, acts), f"has no backward of micro-batch {m}")
        assert e.rank == 0 and e.action is None


@pytest.mark.parametrize("name", [n for n in NAMES if n != "1f1b"])
def test_dropped_weight_pass(name):
    s = SCHEDULES[name](4, 16)
    acts = list(s.actions[0])
    idx = _index(acts, lambda a: a.kind == W)
    w = acts.pop(idx)
    e = _rejected(_with_rank(s, 0, acts), f"I{w.chunk}.{w.mb} is never followed by its "
                  f"W{w.chunk}.{w.mb}")
    assert e.rank == 0


@pytest.mark.parametrize("name", NAMES)
def test_swapped_forward_and_its_backward(name):
    s = SCHEDULES[name](4, 16)
    acts = list(s.actions[0])
    jb = _index(acts, lambda a: a.kind in (B, I))
    jf = _index(acts, lambda a: a.kind == F and (a.chunk, a.mb) == (acts[jb].chunk, acts[jb].mb))
    acts[jf], acts[jb] = acts[jb], acts[jf]
    e = _rejected(_with_rank(s, 0, acts), "backward before its forward")
    _marked(e, jf)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "1f1b"])
def test_swapped_input_gradient_and_its_weight_pass(name):
    s = SCHEDULES[name](4, 16)
    acts = list(s.actions[0])
    jw = _index(acts, lambda a: a.kind == W)
    ji = _index(acts, lambda a: _has(a, (I,), acts[jw].chunk, acts[jw].mb))
    acts[ji], acts[jw] = acts[jw], acts[ji]
    e = _rejected(_with_rank(s, 0, acts), "weight pass without an earlier input-gradient pass")
    _marked(e, ji)


@pytest.mark.parametrize("name,which", [(n, w) for n in NAMES for w in ("forward", "backward", "weight")
                                        if (n, w) != ("1f1b", "weight")])  # 1f1b has no W
def test_duplicated_action(name, which):
    s = SCHEDULES[name](4, 16)
    acts = list(s.actions[0])
    kinds = {"forward": (F,), "backward": (B, I), "weight": (W,)}[which]
    j = _index(acts, lambda a: a.kind in kinds)
    acts.insert(j + 1, acts[j])
    match = {"forward": "second forward of stage", "backward": "second backward of stage",
             "weight": "weight pass without an earlier input-gradient pass"}[which]
    e = _rejected(_with_rank(s, 0, acts), match)
    _marked(e, j + 1)


@pytest.mark.parametrize("name", NAMES)
def test_cross_rank_deadlock(name):
    """Rank 0 runs its first backward of chunk 0 right after the first forward: it waits
    for the next rank, which waits for a forward rank 0 now sends only later.  Every
    rank's own order is still fine; only the dry run across ranks sees it."""
    s = SCHEDULES[name](4, 16)
    acts = list(s.actions[0])
    j = _index(acts, lambda a: _has(a, (B, I), 0, 0))
    acts.insert(1, acts.pop(j))
    e = _rejected(_with_rank(s, 0, acts), r"^rank 0, action \d+ \(R[FB]\d+\.\d+<1\): deadlock: ")
    assert "rank 0 at action" in str(e) and "waits for rank 1 to send" in str(e)
    assert "rank 1 at action" in str(e) and "waits for rank 0 to send" in str(e)
    assert e.action.kind in ("RECV_F", "RECV_B")
    _marked(e)
    # the grid is the lowered schedule (communication included)
    assert "SF0.0>1" in e.grid
