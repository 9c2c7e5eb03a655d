"""Execute one rank's action list on real modules.

This is the only place that runs F / B / I / W / F&B.  It holds no schedule logic: the
order comes from :func:`dualpipe.schedules.get_schedule` and the sends/receives from
:func:`dualpipe.schedules.lower`, compiled once per (schedule, ranks, chunks, mode) into
a flat list of steps.

Which file does what:

* ``pipeline.py``  -- :class:`PipelineRuntime`: construction and ``step()``.
* ``transport.py`` -- the pipeline's transport policy (``transport=`` and
  ``$DUALPIPE_TRANSPORT``, the ring size, the store prefix per pipeline, setup failures as
  :class:`PipelineError`); choosing and opening the transport is :mod:`overlap.connect`.
* ``checks.py``    -- the stage modules' check, ``step()``'s argument checks and the
  step-start handshake.
* ``plan.py``      -- the plan compiler: per rank, typed :class:`~.plan.Step` records
  (the schedule's compute action, the receives it waits for, the sends it posts, how far
  receives are posted ahead) and the proof of when a sent buffer may be reaped.
* ``executor.py``  -- :class:`~.executor.StepExecutor`, the per-step loop.
* ``boundary.py``  -- what crosses a stage boundary: tags, the optional shape/dtype
  declarations, the gradient layout message.
* ``failure.py``   -- the failure protocol: one error on every rank, the end-of-step
  agreement rule, releasing the transports; ``exchange`` for transfers outside a step.
* ``timing.py``    -- :class:`StepStats`, the timeline, the CUDA-event clock.
* ``errors.py``    -- :class:`PipelineError`, :class:`PipelineTimeout`.

One step, as data flows: ``step(inputs)`` -> arguments checked locally and split into
micro-batches (checks) -> a handshake (one ``all_gather`` of a few integers) compares
schedule, ``num_chunks``, mode and argument errors across ranks, so a mismatch or a bad
argument on one rank raises on every rank instead of hanging -> the cached plan for
(schedule, chunks, mode) -> the executor walks its steps: receives are posted ahead of
the compute that needs them (``lookahead`` compute actions) and waited for only when it
starts; F / B / I / W / F&B run on the stage modules; sends are posted right after the
compute that produced them and reaped once the plan proves them delivered, or at the
end of the step -> the end-of-step agreement (``confirm_steps``) -> losses and outputs
gathered, figures handed to the timing.  The shapes and dtypes of what crosses a
boundary are sent once per boundary and input signature, and cached.  Any failure goes
through the failure protocol, so every rank raises the same :class:`PipelineError`.
"""

from __future__ import annotations

from .boundary import set_p2p_tensor_dtype, set_p2p_tensor_shapes
from .errors import PipelineError, PipelineTimeout
from .pipeline import PipelineRuntime
from .timing import StepStats

__all__ = ["PipelineRuntime", "PipelineError", "PipelineTimeout", "StepStats",
           "set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]
