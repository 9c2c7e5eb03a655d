"""Generators against the published orders, the IR's text form, argument errors."""
import json

import pytest

from dualpipe.schedules import (FB, SCHEDULES, Action, dualpipe, dualpipev, get_schedule, lower,
                                spec_of,
                                one_f_one_b, parse_action, zb1p)
from dualpipe.validate import ScheduleError, validate

GOLDEN_CASES = ["dualpipe_r4_n8", "dualpipe_r8_n20", "dualpipev_r1_n2", "dualpipev_r2_n4",
                "dualpipev_r4_n20"]


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_matches_published_order(golden_dir, case):
    g = json.loads((golden_dir / f"{case}.json").read_text())
    s = get_schedule(g["schedule"], g["ranks"], g["chunks"])
    for r, (ours, theirs) in enumerate(zip(s.golden(), g["actions"], strict=True)):
        assert ours == theirs, f"rank {r} differs\nours:   {ours}\ntheirs: {theirs}"


def test_golden_copy_matches_shared():
    """tests/golden is a copy of the recorded published orders; where the shared originals
    sit beside the checkout, the copy must not have drifted from them."""
    from tests.conftest import GOLDEN, SHARED_GOLDEN
    if not SHARED_GOLDEN.is_dir():
        pytest.skip(f"no {SHARED_GOLDEN} beside this checkout to compare the copy with")
    theirs = sorted(p.name for p in SHARED_GOLDEN.iterdir() if p.is_file())
    assert sorted(p.name for p in GOLDEN.iterdir() if p.is_file()) == theirs
    for name in theirs:
        assert (GOLDEN / name).read_bytes() == (SHARED_GOLDEN / name).read_bytes(), name
    assert sorted(f"{c}.json" for c in GOLDEN_CASES) == [n for n in theirs if n.endswith(".json")]


def _grid():
    for name in SCHEDULES:
        ranks = [1, 2, 3, 4, 5, 8] if name == "dualpipev" else [2, 4, 6, 8, 10]
        if name in ("1f1b", "zb1p"):
            ranks = [1, 2, 3, 4, 7, 8]
        ranks = [P for P in [1] + ranks if spec_of(name).supports(P)]
        for P in sorted(set(ranks)):
            lo = 2 * P if name in ("dualpipe", "dualpipev") else P
            for N in sorted({lo, lo + 2, lo + 4, 3 * lo, 4 * lo + 2}):
                yield name, P, N


@pytest.mark.parametrize("name,P,N", list(_grid()))
def test_every_generator_validates(name, P, N):
    s = get_schedule(name, P, N)
    validate(s)
    # the text form parses back to the same actions
    for acts in s.actions:
        assert [parse_action(str(a)) for a in acts] == list(acts)
    for acts in lower(s):
        assert [parse_action(str(a)) for a in acts] == list(acts)


@pytest.mark.parametrize("bad", ["", "X0.1", "F0", "F0.1+I1.0", "SF0.1<2", "RB1.0>3", "F-1.0"])
def test_parse_rejects(bad):
    with pytest.raises(ValueError, match="cannot parse"):
        parse_action(bad)


@pytest.mark.parametrize("gen,P,N,msg", [
    (dualpipe, 3, 12, "even number of ranks"),
    (dualpipe, 0, 12, "even number of ranks"),
    (dualpipe, 4, 6, r"num_chunks >= 8"),
    (dualpipe, 4, 9, r"even num_chunks"),
    (dualpipev, 0, 4, "num_ranks >= 1"),
    (dualpipev, 4, 7, r"num_chunks >= 8"),
    (one_f_one_b, 4, 3, r"num_chunks >= 4"),
    (zb1p, 0, 3, "num_ranks >= 1"),
    (dualpipe, 4.0, 8, "must be an int"),
])
def test_argument_errors(gen, P, N, msg):
    with pytest.raises(ValueError, match=msg):
        gen(P, N)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="choose one of"):
        get_schedule("no-such-schedule", 4, 8)


def test_dualpipe_placement_and_streams():
    s = dualpipe(4, 8)
    assert s.placement[0] == ((0, 0), (1, 3))
    assert s.placement[3] == ((0, 3), (1, 0))
    assert [st.first_microbatch for st in s.streams] == [0, 4]
    v = dualpipev(3, 6)
    assert v.placement[2] == ((0, 2), (0, 3))
    assert v.streams[0].num_stages == 6


def _replace(s, rank, idx, new):
    acts = [list(a) for a in s.actions]
    if new is None:
        del acts[rank][idx]
    else:
        acts[rank][idx] = new
    return type(s)(s.name, s.num_ranks, s.num_chunks, s.streams, s.placement,
                   tuple(tuple(a) for a in acts))


def test_validator_reports_missing_forward():
    s = dualpipe(4, 8)
    bad = _replace(s, 0, 0, None)  # drop F0.0 on rank 0
    with pytest.raises(ScheduleError) as e:
        validate(bad)
    assert e.value.rank == 0 and "backward before its forward" in str(e.value)


def test_validator_reports_missing_w():
    s = dualpipe(4, 8)
    idx = [str(a) for a in s[0]].index("W1.0")
    with pytest.raises(ScheduleError, match="never followed by its W1.0"):
        validate(_replace(s, 0, idx, None))


def test_validator_reports_double_weight_pass():
    s = one_f_one_b(2, 2)
    idx = [str(a) for a in s[1]].index("B0.0")
    acts = [list(a) for a in s.actions]
    acts[1].insert(idx + 1, Action("W", 0, 0))
    bad = type(s)(s.name, 2, 2, s.streams, s.placement, tuple(tuple(a) for a in acts))
    with pytest.raises(ScheduleError, match="without an earlier input-gradient"):
        validate(bad)


def test_validator_reports_deadlock_with_rank_and_action():
    # swap rank 1's first backward ahead of a forward it depends on via rank 0
    s = one_f_one_b(2, 2)
    acts = [list(a) for a in s.actions]
    # rank 0: F0.0 F0.1 B0.0 B0.1 ; make rank 0 run B0.0 before F0.1 and rank 1
    # run B0.1 before B0.0 -> rank 0 waits for grad 0 which rank 1 sends only after F0.1
    acts[1] = [Action("F", 0, 0), Action("F", 0, 1), Action("B", 0, 1), Action("B", 0, 0)]
    acts[0] = [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)]
    bad = type(s)(s.name, 2, 2, s.streams, s.placement, tuple(tuple(a) for a in acts))
    with pytest.raises(ScheduleError) as e:
        validate(bad)
    msg = str(e.value)
    assert "deadlock" in msg and "rank 0" in msg and "[" in e.value.grid


def test_lower_keeps_channel_order_and_skips_local_transfers():
    s = dualpipev(2, 4)
    low = lower(s)
    # stage 1 -> stage 2 sits on rank 1 both sides: no comm for that hop
    for a in low[1]:
        if a.kind in ("SEND_F", "RECV_F", "SEND_B", "RECV_B"):
            assert a.peer == 0
    # each send has a matching receive, in the same order per channel
    # (rank 0 chunk c feeds rank 1 chunk c on both sides of the V)
    sends = [(a.chunk, a.mb, a.kind[-1]) for a in low[0] if a.kind.startswith("SEND")]
    recvs = [(a.chunk, a.mb, a.kind[-1]) for a in low[1] if a.kind.startswith("RECV")]
    assert len(sends) == 8  # 4 activations stage 0->1, 4 gradients stage 3->2
    assert sends == recvs


def test_fb_pair_text():
    a = Action(FB, 0, 3, 1, 1)
    assert str(a) == "F0.3+B1.1" and parse_action("F0.3+B1.1") == a
    assert a.parts() == (("F", 0, 3), ("B", 1, 1))


def test_which_rank_passes_which_microbatches():
    dp = dualpipe(4, 8)
    assert dp.input_microbatches(0) == range(0, 4) and dp.loss_microbatches(0) == range(4, 8)
    assert dp.input_microbatches(3) == range(4, 8) and dp.loss_microbatches(3) == range(0, 4)
    assert dp.input_microbatches(1) is None and dp.loss_microbatches(2) is None
    v = dualpipev(2, 4)
    assert v.input_chunk(0) == 0 and v.loss_chunk(0) == 1
    assert v.input_microbatches(0) == v.loss_microbatches(0) == range(4)
    assert v.input_microbatches(1) is None
    f = one_f_one_b(3, 3)
    assert f.input_microbatches(0) == range(3) and f.loss_microbatches(2) == range(3)
    assert f.loss_microbatches(0) is None
