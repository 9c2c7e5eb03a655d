"""Adding a schedule is one generator and one registry entry: a toy GPipe registered in
tests/toy_schedule.py is validated, simulated, drawn and run by the runtime on gloo
against the single-process reference, with no other change anywhere."""
from __future__ import annotations

import pytest

import tests.toy_schedule as toy
from dualpipe.draw import draw
from dualpipe.schedules import REGISTRY, ScheduleSpec, get_schedule, register, spec_of, unregister
from dualpipe.simulate import Costs, formula_bubble, pipeline_degree, simulate
from dualpipe.validate import validate
from tests.test_runtime import check


@pytest.fixture(autouse=True, scope="module")
def _toy_registered():
    toy.ensure_registered()
    yield
    unregister(toy.NAME)


def test_the_toy_is_registered_and_its_facts_come_from_the_placement():
    assert REGISTRY[toy.NAME].title == "GPipe"
    s = get_schedule(toy.NAME, 3, 4)
    assert s.stages_per_rank == 1 and s.num_stages == 3 and not s.duplicated_stages
    assert pipeline_degree(toy.NAME, 3) == 3
    assert formula_bubble(toy.NAME, 3, Costs(f=1, b=2, w=0)) == 6


def test_validator_simulator_and_drawer_take_it(tmp_path):
    s = get_schedule(toy.NAME, 3, 4)
    validate(s)
    res = simulate(s, Costs(f=1, b=2, w=0))
    assert res.peak_activations == [4, 4, 4]  # GPipe keeps every micro-batch
    assert res.bubble == pytest.approx(res.formula_bubble)
    draw(tmp_path / "gpipe.json", res.intervals, s)
    draw(tmp_path / "gpipe.png", res.intervals, s)
    assert (tmp_path / "gpipe.png").stat().st_size > 0


def test_the_runtime_runs_it_against_the_reference():
    check(toy.NAME, 3, [dict(chunks=4, toy=True), dict(chunks=3, toy=True, steps=2)])


def test_registry_misuse():
    with pytest.raises(ValueError, match="registered already"):
        register(REGISTRY["1f1b"])
    with pytest.raises(TypeError, match="ScheduleSpec"):
        register(object())
    with pytest.raises(ValueError, match="unknown schedule 'nope'.*1f1b"):
        spec_of("nope")
    assert isinstance(REGISTRY["dualpipe"], ScheduleSpec)
