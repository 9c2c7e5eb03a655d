"""A stage factory for ``python -m dualpipe plan --stage examples.plan_stage:make_block``.

``make_block()`` returns what the planner measures: one transformer-style block (pre-norm
residual MLP: LayerNorm, Linear d -> 4d, GELU, Linear 4d -> d), an example micro-batch of
``batch`` sequences of ``seq`` tokens, and no criterion (a middle stage: the planner drives
the backward with a gradient of ones).  The planner times its forward, its full backward
and the split the runtime makes (the two Linear layers defer their weight gradients to the
W pass), counts the bytes autograd saves for the backward, the parameters and the output,
and prices every schedule for a model of ``--layers`` such blocks.

    python -m dualpipe plan --stage examples.plan_stage:make_block \\
        --devices 8 --layers 48 --global-batch 512 --memory-cap 64MiB

(docs/performance.md §9 shows what it printed.)  Sizes are small so that a block runs in
about a millisecond on a CPU; edit them (or write your own factory with your real block,
on its real device) to plan a real run.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class MLPBlock(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``: the MLP half of a pre-norm transformer layer."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def make_block(dim: int = 128, batch: int = 4, seq: int = 32, seed: int = 0):
    """``(block, example micro-batch [batch, seq, dim], None)``."""
    torch.manual_seed(seed)
    return MLPBlock(dim), torch.randn(batch, seq, dim), None
