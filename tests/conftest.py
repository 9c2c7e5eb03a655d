import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The published DualPipe/DualPipeV orders, recorded from deepseek-ai/DualPipe: test data kept
# in the repo (tests/test_schedules.py checks the copy against ../shared/golden when present).
GOLDEN = ROOT / "tests" / "golden"
SHARED_GOLDEN = ROOT.parent / "shared" / "golden"


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", default=False,
                     help="also run tests marked slow (long runs, big rank counts)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running; run with --slow")
    config.addinivalue_line("markers", "gpu: needs CUDA; skipped with a reason without it")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow test: run with ./run test --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def golden_dir():
    if not GOLDEN.is_dir():
        pytest.fail(f"golden schedules not found at {GOLDEN}: they are part of the repository")
    return GOLDEN
