"""Statistics of repeated measurements: summaries and paired ratios.

Timing a step and turning per-rank spans into makespans is ``dualpipe.launch``'s
(``timed``, ``makespans``): the planner's ``--verify`` uses them too, and an installed
``dualpipe`` has no ``bench``.
"""
from __future__ import annotations

import statistics
from typing import Sequence


def summarize(xs: Sequence[float]) -> dict:
    """median, quartiles, IQR, min, max, mean, n of ``xs`` (no NaN: raises when empty)."""
    xs = sorted(float(x) for x in xs)
    if not xs:
        raise ValueError("no samples to summarize: the benchmark did not run")
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1,
            "min": xs[0], "max": xs[-1], "mean": statistics.fmean(xs), "n": len(xs)}


def ratio_samples(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-repeat ratios a[i] / b[i] (the two sides measured back to back)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    return [x / y for x, y in zip(a, b)]
