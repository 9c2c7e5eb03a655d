"""Stage factories for ``python -m dualpipe plan --verify`` tests.

They live at module level in an importable module: ``--verify`` spawns ranks that import
the factory by its ``module:function`` reference and build their stages from it.
"""
from __future__ import annotations

import torch

from bench.stages import calibrate_host_sleep, sleep_layer_class

# per sample of a micro-batch, seconds: forward, full backward, its weight-gradient part
F_ROW, B_ROW, W_ROW = 0.002, 0.004, 0.002
ROWS, DIM = 2, 64

_calibrated = False


class RowSleepLayer(sleep_layer_class()):
    """A calibrated sleep layer whose costs are per sample: a micro-batch of ``m`` rows
    costs ``m`` times ``F_ROW``, ``B_ROW``, ``W_ROW``, which is the planner's linear
    model exactly (a plain sleep layer costs the same for any micro-batch size)."""

    def __init__(self):
        super().__init__(DIM, F_ROW, B_ROW, W_ROW)

    def forward(self, x):
        m = x.shape[0]
        self.f, self.b_in, self.w = F_ROW * m, (B_ROW - W_ROW) * m, W_ROW * m
        return super().forward(x)


def make_sleep_block():
    """``(RowSleepLayer(), example micro-batch [ROWS, DIM], None)``; calibrates the host
    sleep of this process on first use."""
    global _calibrated
    if not _calibrated:
        calibrate_host_sleep()
        _calibrated = True
    return RowSleepLayer(), torch.randn(ROWS, DIM), None
