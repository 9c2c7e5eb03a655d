"""The user-facing pipeline classes: drop-in for ``deepseek-ai/DualPipe``."""
from __future__ import annotations

from .runtime import PipelineRuntime
from .training import reduce_dualpipe_grads  # noqa: F401 - re-exported, its home is training

__all__ = ["DualPipe", "DualPipeV", "Pipeline", "reduce_dualpipe_grads"]


class DualPipe(PipelineRuntime):
    """DualPipe on an even number ``P`` of ranks.

    ``modules = (stage r of the forward direction, stage P-1-r of the reverse
    direction)`` for pipeline rank ``r``; both directions use the same stage
    definitions, so a stage's parameters live on two ranks and its gradient is the sum
    of the two copies' (see :func:`dualpipe.reduce_dualpipe_grads`).

    Args:
        modules: the two stage modules of this rank, as a tuple, list,
            ``nn.ModuleList`` or ``nn.Sequential`` (as the reference accepts them), of
            one class if that class defines ``overlapped_forward_backward``.  A stage
            may return any tensors, its inputs passed through included (see
            docs/training.md).
        batch_dim: the batch dimension of inputs and labels.
        process_group: the pipeline group (default: the world).
        rank_mapping: ``rank_mapping[group_rank] = pipeline rank`` (default identity).
        timeout: seconds any wait on another rank may take before
            :class:`~dualpipe.PipelineTimeout` is raised (default 300).
        split_linear_weight_grads: defer ``nn.Linear`` weight gradients to the
            schedule's W passes without custom autograd code.
        lookahead: compute actions whose receives are posted ahead (default 2).
        record_timeline: keep per-action times of the last step (``.timeline``);
            ``.last_stats`` is measured either way (on CUDA with CUDA events).
        confirm_steps: every rank agrees a step succeeded before any returns from it
            (one tiny all_gather per step; default True).
        transport: how stage boundaries travel.  ``"auto"`` (default): shared memory
            (:mod:`overlap.shm`) when the group is gloo, the stages are on CPU and every
            rank is on this host, else the process group's backend (a private gloo
            group, or two private NCCL communicators on GPUs); ``"shm"`` requires
            shared memory (``ValueError`` on every rank if any cannot use it);
            ``"group"`` always uses the process group's backend.  The environment
            variable ``DUALPIPE_TRANSPORT`` overrides ``"auto"``, and
            ``DUALPIPE_SHM_RING_BYTES`` sizes the shared-memory rings (default 4 MiB per
            rank pair; see docs/transport.md).  The choice made is in ``.transport``
            (``"shm"``, ``"gloo"`` or ``"nccl"``).
        nccl_max_ctas: NCCL's CTA cap (about one SM per CTA) for the pipeline's two
            private NCCL communicators: an int in ``[1, 64]`` or an
            :class:`overlap.partition.SMPartition` (its ``min(comm_sms, 64)``).  ``None``
            (default) leaves NCCL's default or ``$NCCL_MAX_CTAS``.  It caps how many SMs
            the transfers' kernels occupy; it does not place them on the partition's
            communication SMs (they run on ProcessGroupNCCL's own stream, see
            docs/sm_partition.md).  Validated everywhere, ignored (logged) when the
            transport is not NCCL.

    Waits on NCCL transfers are stream-ordered (the current CUDA stream waits, the host
    does not); ``timeout`` then bounds the waits where the host must know (the step
    handshake, shape messages, the end-of-step agreement, which queues behind every
    transfer the step waited for); the communicators' own watchdog (``2 * timeout``, a
    backstop) the rest.  ``last_stats`` / ``timeline`` are on the device clock on CUDA
    (see :class:`dualpipe.runtime.PipelineRuntime`).  ``close()`` releases the transports
    (NCCL communicators shut down); garbage collection does it too.

    ``step(*inputs, num_chunks, criterion, labels, return_outputs)``: see
    :meth:`PipelineRuntime.step`.  Rank 0 passes the first half of the micro-batches
    (its loss/outputs are the last rank's), the last rank the second half.
    """

    schedule_name = "dualpipe"


class DualPipeV(PipelineRuntime):
    """DualPipeV ("cut-in-half" DualPipe) on ``R`` ranks with ``2R`` stages.

    ``modules = (stage r, stage 2R-1-r)`` on pipeline rank ``r``; rank 0 passes the
    inputs, the labels and the criterion and receives the loss.  Other arguments as
    :class:`DualPipe`.
    """

    schedule_name = "dualpipev"


class Pipeline(PipelineRuntime):
    """Any schedule of :data:`dualpipe.schedules.SCHEDULES` by name, e.g.
    ``Pipeline(stage, schedule="1f1b")`` or ``"zb1p"`` with one stage per rank
    (rank 0 passes inputs; the last rank the criterion and labels and gets the loss).
    """

    def __init__(self, modules, batch_dim: int = 0, process_group=None, rank_mapping=None, *,
                 schedule: str, **kw):
        super().__init__(modules, batch_dim, process_group, rank_mapping, schedule=schedule, **kw)
