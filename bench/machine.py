"""What a benchmark's numbers were measured on: the machine, the software, the source.

:func:`machine_info` goes into every JSON result; :func:`describe_machine` is its one-line
form for tables, plots and logs.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(backend: str, **extra: Any) -> dict:
    """What the numbers were measured on (goes into every JSON result)."""
    import torch
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "mem_gib": _mem_gib(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "backend": backend,
        "cuda": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # DUALPIPE_BENCH_COMMIT / _NOTE describe the source when the benchmarks run from
        # an exported tree (``git archive``), e.g. while the checkout has edits in progress
        "git_commit": os.environ.get("DUALPIPE_BENCH_COMMIT") or _git_commit(),
        "runtime_modified_since_commit": ([] if os.environ.get("DUALPIPE_BENCH_COMMIT")
                                          else _runtime_dirty()),
        "source_note": os.environ.get("DUALPIPE_BENCH_NOTE"),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    info.update(extra)
    return info


def _mem_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:  # noqa: BLE001 - not a git checkout
        return None


def _runtime_dirty() -> list[str] | None:
    """Files of dualpipe/ and overlap/ that differ from the commit (what was measured is
    the working tree)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--",
                              "dualpipe", "overlap"], capture_output=True, text=True, timeout=10)
        return [line[3:] for line in out.stdout.splitlines() if line.strip()]
    except Exception:  # noqa: BLE001
        return None


def describe_machine(m: dict) -> str:
    """One line for tables and logs."""
    dev = m["gpu"] or f"{m['cpu_model']}, {m['cpu_cores_usable']} cores"
    return (f"{dev}; torch {m['torch']}; backend {m['backend']}; load avg "
            f"{m['load_avg_1_5_15'][0]} at start")
