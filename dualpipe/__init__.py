"""Bidirectional pipeline parallelism (DualPipe, DualPipeV) with schedules as data.

Drop-in for ``deepseek-ai/DualPipe``::

    from dualpipe import DualPipe, DualPipeV, WeightGradStore
    from dualpipe import set_p2p_tensor_shapes, set_p2p_tensor_dtype   # optional here
    from dualpipe.utils import run_backward

The torch-dependent names are imported on first use, so the schedule tools
(``dualpipe.schedules``, ``simulate``, ``validate``, ``draw`` and the ``simulate``/``draw``
commands) start without importing torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "DualPipe": "api", "DualPipeV": "api", "Pipeline": "api",
    "reduce_dualpipe_grads": "training", "clip_grad_norm_": "training",
    "all_reduce_grads": "training", "local_stages": "training", "sync_grads": "training",
    "PipelineError": "runtime", "PipelineTimeout": "runtime", "StepStats": "runtime",
    "set_p2p_tensor_shapes": "runtime", "set_p2p_tensor_dtype": "runtime",
    "WeightGradStore": "weight_grad", "split_linear_weight_grads": "weight_grad",
    "SCHEDULES": "schedules", "get_schedule": "schedules",
}

# submodules reachable as attributes (``dualpipe.checkpoint.save(...)``), imported on use
_SUBMODULES = ("checkpoint", "training", "schedules", "simulate", "validate", "draw", "utils",
               "weight_grad", "launch")

__all__ = sorted(_LAZY) + ["__version__"] + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'dualpipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
