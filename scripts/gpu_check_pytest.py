"""pytest plugin of ``scripts/gpu_check.py``: every test's outcome as JSON, skips included.

A GPU test that skips on a GPU machine is a failure of the GPU check, and pytest's exit
status does not say so; this plugin records each selected test's outcome (passed,
failed, error, skipped with its reason, xfailed, xpassed) so the check can list them.

    PYTHONPATH=scripts python -m pytest -p gpu_check_pytest --gpu-check-json out.json \\
        --gpu-check-force test_kernels.py -m gpu tests

``--gpu-check-force NAME`` (repeatable) gives the ``gpu`` marker to every test of the
files called ``NAME`` before ``-m`` selects, for files whose tests run compiled on a GPU
but are not marked (tests/test_kernels.py runs its Triton kernels on CUDA when there is
one, under the interpreter otherwise). A file where some test already carries the marker
is left as it is: it says itself which of its tests need the GPU.
"""
from __future__ import annotations

import json
import os
import time

import pytest

_state: dict = {"tests": {}, "deselected": 0, "forced": 0, "t0": None, "path": None}


def pytest_addoption(parser):
    group = parser.getgroup("gpu-check", "scripts/gpu_check.py")
    group.addoption("--gpu-check-json", default=None, metavar="FILE",
                    help="write every selected test's outcome to FILE (JSON)")
    group.addoption("--gpu-check-force", action="append", default=[], metavar="NAME",
                    help="give the gpu marker to the tests of files named NAME")


def pytest_sessionstart(session):
    _state.update(tests={}, deselected=0, forced=0, t0=time.time())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Runs before the marker selection of ``-m`` (pytest's own hook is not tryfirst)."""
    force = set(config.getoption("--gpu-check-force") or ())
    if not force:
        return
    by_file: dict = {}
    for item in items:
        path = getattr(item, "path", None)
        name = path.name if path is not None else os.path.basename(str(item.fspath))
        if name in force:
            by_file.setdefault(str(path or item.fspath), []).append(item)
    for file_items in by_file.values():
        if any(item.get_closest_marker("gpu") for item in file_items):
            continue  # the file marks its GPU tests itself: trust it
        for item in file_items:
            item.add_marker(pytest.mark.gpu)
            _state["forced"] += 1


def pytest_deselected(items):
    _state["deselected"] += len(items)


def _reason(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # a skip: (file, line, reason)
        return str(longrepr[2]).removeprefix("Skipped: ")
    text = str(longrepr) if longrepr is not None else ""
    return text[-1500:]


def pytest_collectreport(report):
    """A file that fails to import is an error of the run (its tests never ran)."""
    if report.failed:
        _state["tests"][report.nodeid or "(collection)"] = {
            "nodeid": report.nodeid or "(collection)", "outcome": "error", "duration_s": 0.0,
            "gpu_marked": None, "reason": "collection failed: " + _reason(report)}
        if _state["path"]:
            _write(finished=False)


def pytest_runtest_logreport(report):
    entry = _state["tests"].setdefault(report.nodeid, {
        "nodeid": report.nodeid, "outcome": None, "duration_s": 0.0,
        "gpu_marked": "gpu" in report.keywords, "reason": None})
    entry["duration_s"] += float(getattr(report, "duration", 0.0) or 0.0)
    if hasattr(report, "wasxfail"):
        entry["outcome"] = "xfailed" if report.skipped else "xpassed"
        entry["reason"] = str(report.wasxfail)
    elif report.skipped:
        entry["outcome"] = "skipped"
        entry["reason"] = _reason(report)
    elif report.failed:
        entry["outcome"] = "failed" if report.when == "call" else "error"
        entry["reason"] = _reason(report)
    elif report.when == "call" and entry["outcome"] is None:
        entry["outcome"] = "passed"
    if report.when == "teardown" and _state["path"]:
        _write(finished=False)  # so a run killed by its time box still says what passed


def pytest_configure(config):
    _state["path"] = config.getoption("--gpu-check-json")


def _write(*, finished: bool, exitstatus=None, collected=None) -> None:
    tests = [dict(t) for t in _state["tests"].values() if t["outcome"] is not None
             or finished]
    for t in tests:
        if t["outcome"] is None:  # setup passed but no call report (interrupted)
            t["outcome"] = "error"
            t["reason"] = t["reason"] or "no result recorded (run interrupted?)"
    counts: dict = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    payload = {
        "finished": finished, "exitstatus": exitstatus, "collected": collected,
        "deselected": _state["deselected"], "forced_gpu_marker": _state["forced"],
        "counts": counts, "wall_s": time.time() - (_state["t0"] or time.time()),
        "tests": tests,
    }
    tmp = _state["path"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, _state["path"])


def pytest_sessionfinish(session, exitstatus):
    if _state["path"]:
        _write(finished=True, exitstatus=int(exitstatus), collected=session.testscollected)
