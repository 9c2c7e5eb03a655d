"""Bidirectional pipeline parallelism (DualPipe, DualPipeV) with schedules as data.

Drop-in for ``deepseek-ai/DualPipe``::

    from dualpipe import DualPipe, DualPipeV, WeightGradStore
    from dualpipe import set_p2p_tensor_shapes, set_p2p_tensor_dtype   # optional here
    from dualpipe.utils import run_backward
"""
from .api import DualPipe, DualPipeV, Pipeline, reduce_dualpipe_grads
from .runtime import (PipelineError, PipelineTimeout, StepStats, set_p2p_tensor_dtype,
                      set_p2p_tensor_shapes)
from .schedules import SCHEDULES, get_schedule
from .weight_grad import WeightGradStore, split_linear_weight_grads

__version__ = "0.1.0"

__all__ = ["DualPipe", "DualPipeV", "Pipeline", "WeightGradStore", "set_p2p_tensor_shapes",
           "set_p2p_tensor_dtype", "PipelineError", "PipelineTimeout", "StepStats",
           "split_linear_weight_grads", "reduce_dualpipe_grads", "SCHEDULES", "get_schedule", "__version__"]
