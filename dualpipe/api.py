"""The user-facing pipeline classes: drop-in for ``deepseek-ai/DualPipe``."""
from __future__ import annotations

from .runtime import PipelineRuntime

__all__ = ["DualPipe", "DualPipeV", "Pipeline", "reduce_dualpipe_grads"]


class DualPipe(PipelineRuntime):
    """DualPipe on an even number ``P`` of ranks.

    ``modules = (stage r of the forward direction, stage P-1-r of the reverse
    direction)`` for pipeline rank ``r``; both directions use the same stage
    definitions, so a stage's parameters live on two ranks and its gradient is the sum
    of the two copies' (see :func:`dualpipe.reduce_dualpipe_grads`).

    Args:
        modules: the two stage modules of this rank, of one class if that class
            defines ``overlapped_forward_backward``.
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


def reduce_dualpipe_grads(pipe: PipelineRuntime) -> None:
    """Make both copies of every DualPipe stage hold the stage's full gradient.

    In DualPipe stage ``s`` lives on rank ``s`` (chunk 0, forward direction) and on
    rank ``P-1-s`` (chunk 1, reverse direction); each copy accumulates the gradient of
    the micro-batches it ran.  Call this on every rank after ``step()`` and before the
    optimizer step: each rank swaps its two chunks' gradients with its partner rank
    and adds, so both copies get ``g_forward + g_reverse`` (bitwise equal on both
    sides; floating-point addition is commutative) and stay identical after identical
    optimizer updates.  A no-op for schedules without duplicated stages.
    """
    if pipe.schedule_name != "dualpipe":
        return
    import torch

    partner = pipe.num_ranks - 1 - pipe.rank
    mine, theirs = [], []
    for c in (0, 1):
        params = list(pipe.module[c].parameters())
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params]) if params else \
            torch.zeros(0, device=pipe.device)
        mine.append(flat)
        theirs.append(torch.empty_like(flat))
    # my chunk c holds the stage that the partner holds as chunk 1-c
    g = pipe._to_group[partner]

    def swap(p2p):
        recv = p2p.irecv([theirs[1], theirs[0]], g, "gradients of the duplicated stages", tag=4)
        send = p2p.isend(mine, g, "gradients of the duplicated stages", tag=4)
        recv.wait(pipe.timeout)
        send.wait(pipe.timeout)

    pipe._exchange("reduce_dualpipe_grads", swap)
    for c in (0, 1):
        params = list(pipe.module[c].parameters())
        total = mine[c] + theirs[c]
        off = 0
        for p in params:
            n = p.numel()
            p.grad.copy_(total[off: off + n].view_as(p))
            off += n
