"""Wiring a schedule into pipelines for a benchmark: our runtime's stages on one rank,
that rank's inputs and labels, and which of ``torch.distributed.pipelining``'s schedules
this torch has (the baseline).
"""
from __future__ import annotations

from typing import Any, Callable


def build_ours(name: str, rank: int, world: int, num_chunks: int,
               make_stage: Callable[[int], Any], **kw):
    """Our pipeline for ``name`` on this rank, with ``make_stage(stage_index)`` for each of
    the rank's stages (placement from the schedule).  Returns ``(pipe, schedule)``."""
    from dualpipe import Pipeline
    from dualpipe.schedules import get_schedule
    s = get_schedule(name, world, num_chunks)
    mods = [make_stage(stage) for (_st, stage) in s.placement[rank]]
    return Pipeline(mods, schedule=name, **kw), s


def rank_io(s, rank: int, x, y, rows_per_mb: int):
    """This rank's share of the batch for our runtime: inputs where it holds a stream's
    first stage, labels where it holds a last stage (``x``/``y`` cover all micro-batches)."""
    ins, outs = s.input_microbatches(rank), s.loss_microbatches(rank)
    inputs = () if ins is None else (x[ins.start * rows_per_mb:ins.stop * rows_per_mb],)
    labels = () if outs is None else (y[outs.start * rows_per_mb:outs.stop * rows_per_mb],)
    return inputs, labels


def torch_pipelining_status() -> dict:
    """Which of torch.distributed.pipelining's schedules this torch has."""
    import torch
    out = {"torch": torch.__version__, "Schedule1F1B": False, "ScheduleDualPipeV": False,
           "reason": None}
    try:
        from torch.distributed.pipelining import schedules as sch
    except Exception as e:  # noqa: BLE001
        out["reason"] = f"torch.distributed.pipelining is not importable: {e}"
        return out
    out["Schedule1F1B"] = hasattr(sch, "Schedule1F1B")
    out["ScheduleDualPipeV"] = hasattr(sch, "ScheduleDualPipeV")
    if not out["ScheduleDualPipeV"]:
        out["reason"] = (f"torch {torch.__version__} has no ScheduleDualPipeV (added in torch "
                         "2.8); the DualPipeV comparison is skipped")
    return out
