"""pytest configuration for the micro benchmarks in ``bench/`` (``pytest bench/ --benchmark-only``)."""
from __future__ import annotations


def pytest_benchmark_update_machine_info(config, machine_info):
    """Put our machine description (cpu model, cores, torch, load average) into
    pytest-benchmark's JSON next to its own."""
    from bench import machine
    machine_info["dualpipe_bench"] = machine.machine_info("none (single process)")
