"""Helpers with the published ``dualpipe.utils`` names.

``run_backward(tensors, grad_tensors)`` runs autograd from ``tensors`` with the given
gradients without checking that the tensors still hold data (the runtime releases
the data of outputs it has sent; autograd needs only their ``grad_fn``).
``scatter`` / ``gather`` split a batch into micro-batches and join outputs back.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.autograd import Variable

from .weight_grad import WeightGradStore

__all__ = ["run_backward", "scatter", "gather", "cosine_distance", "WeightGradStore"]


def run_backward(tensors: Sequence[torch.Tensor], grad_tensors: Sequence[torch.Tensor]) -> None:
    """Accumulate gradients of ``tensors`` (seeded with ``grad_tensors``) into leaves."""
    Variable._execution_engine.run_backward(
        tuple(tensors), tuple(grad_tensors), keep_graph=False, create_graph=False,
        inputs=(), allow_unreachable=True, accumulate_grad=True)


def scatter(inputs, chunks: int, dim: int) -> list[tuple]:
    """Split each tensor of ``inputs`` into ``chunks`` along ``dim``; ``None`` stays
    ``None``.  Returns one tuple per micro-batch."""
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    parts = [[None] * chunks if x is None else list(x.tensor_split(chunks, dim=dim))
             for x in inputs]
    if not parts:
        return [() for _ in range(chunks)]
    return [tuple(p) for p in zip(*parts)]


def gather(micro_outputs: Sequence[Sequence[torch.Tensor | None]], dim: int) -> list:
    """Concatenate per-micro-batch outputs along ``dim``: one tensor per output."""
    out = []
    for i in range(len(micro_outputs[0])):
        col = [mb[i] for mb in micro_outputs]
        out.append(None if col[0] is None else torch.cat(col, dim=dim))
    return out


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``1 - cos(a, b)`` computed in float64 (0 for two zero tensors): the measure the
    project's numerics checks use for gradients (pipelined vs single process)."""
    a, b = a.double().flatten(), b.double().flatten()
    if a.norm() == 0 and b.norm() == 0:
        return 0.0
    return float(1 - (a @ b) / (a.norm() * b.norm()))
