""":class:`PipelineRuntime`: construction (arguments, transport, failure board) and
``step()``, which checks, handshakes, looks up the plan and hands the step to a
:class:`~dualpipe.runtime.executor.StepExecutor`.  The other jobs are mixins, each in
its own file: :class:`~dualpipe.runtime.checks.ArgChecks` (arguments, handshake),
:class:`~dualpipe.runtime.failure.FailureProtocol` (failures, release, ``exchange``),
:class:`~dualpipe.runtime.timing.StepTiming` (``last_stats``, ``timeline``).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from typing import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from overlap.p2p import TensorMeta

from ..schedules import Schedule, get_schedule, placement_schedule, spec_of
from ..weight_grad import WeightGradStore
from ..weight_grad import split_linear_weight_grads as _split_linear
from . import transport as _transport
from .checks import ArgChecks, is_fsdp, stage_modules
from .executor import StepExecutor
from .failure import FailureProtocol
from .plan import Plan, compile_plans
from .timing import StepTiming

__all__ = ["PipelineRuntime"]

log = logging.getLogger("dualpipe.runtime")


class PipelineRuntime(ArgChecks, FailureProtocol, StepTiming, nn.Module):
    """Run any schedule of :mod:`dualpipe.schedules` over ``modules`` on this rank.

    Users normally construct :class:`dualpipe.DualPipe`, :class:`dualpipe.DualPipeV` or
    :class:`dualpipe.Pipeline`; see those for the arguments.

    ``rank`` is this rank's pipeline rank; ``to_group[pipeline rank]`` is that rank's
    rank in ``group`` (the process group), which the transfers of :meth:`exchange`
    address.

    Timing (:attr:`last_stats`, :attr:`timeline`) uses one clock per device.  On CPU it
    is the host clock (``time.perf_counter``), seconds from the start of ``step()``.  On
    CUDA it is the *device* clock: every interval, compute and wait alike, is a pair of
    CUDA events recorded on the current stream, in seconds from an event recorded when
    ``step()`` began.  A compute interval is what the stream spent on the action's
    kernels; a wait interval is how long the stream stalled at a receive (waits on NCCL
    transfers are stream-ordered, so the host does not wait there at all and a host
    clock would measure nothing); ``wall`` runs to an event recorded after the step's
    last send was waited for.  The device clock, not host times next to device times,
    because with stream-ordered waits the host runs ahead of the device and the two
    clocks no longer describe the same moments: a mix of both made ``idle`` and the
    overlap metrics meaningless.  The events are read lazily, when :attr:`last_stats`
    or :attr:`timeline` is first accessed after a step (that access synchronizes with
    the step's last event); a step that nobody inspects costs two event records per
    action and no synchronization.  The origin is when the device reached ``step()``:
    on an idle device (e.g. after ``torch.cuda.synchronize()``) that is the host's call
    within launch latency.  Work that a stage runs on other streams is seen only as far
    as the current stream waits for it.
    """

    schedule_name: str = ""

    def __init__(self, modules: Sequence[nn.Module] | nn.Module, batch_dim: int = 0,
                 process_group: dist.ProcessGroup | None = None,
                 rank_mapping: Sequence[int] | None = None, *,
                 schedule: str | None = None, timeout: float = 300.0,
                 split_linear_weight_grads: bool = False, lookahead: int = 2,
                 record_timeline: bool = True, confirm_steps: bool = True,
                 transport: str = "auto", nccl_max_ctas=None) -> None:
        super().__init__()
        self._p2p = None
        self._pg = None
        self._groups_finalizer = None
        self._board = None
        self._stopped: str | None = None
        self._stopped_error = None  # a PipelineError raised by the next step
        self._agreements = 0  # end-of-step agreements completed
        self._arg_sizes = (-1, -1)  # this step's (inputs, labels) batch sizes, -1: none
        self._label_pairs: dict[int, tuple] = {}
        name = schedule or self.schedule_name
        spec_of(name)  # ValueError naming the registered schedules
        self.schedule_name = name
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialized: call "
                               "torch.distributed.init_process_group() (gloo on CPU, nccl on "
                               "GPUs) on every rank before building the pipeline")
        group = process_group if process_group is not None else \
            dist.distributed_c10d._get_default_group()
        # the placement says how many stages a rank holds (and refuses a rank count the
        # schedule cannot run, e.g. DualPipe on an odd one)
        placed = placement_schedule(name, group.size())
        modules = stage_modules(modules, placed.stages_per_rank, name)
        self.module = nn.ModuleList(modules)
        self.batch_dim = batch_dim
        self.group = group
        self.num_ranks = self.group.size()
        if rank_mapping is None:
            rank_mapping = list(range(self.num_ranks))
        rank_mapping = [int(r) for r in rank_mapping]
        if sorted(rank_mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of 0..{self.num_ranks - 1} "
                             f"(group rank -> pipeline rank), got {rank_mapping}")
        to_group = [0] * self.num_ranks
        for g, p in enumerate(rank_mapping):
            to_group[p] = g
        self.to_group = tuple(to_group)  # pipeline rank -> group rank
        self.rank = rank_mapping[self.group.rank()]
        self._to_pipe = rank_mapping  # group rank -> pipeline rank
        params = [p for m in modules for p in m.parameters()]
        devs = {p.device for p in params}
        if len(devs) > 1:
            raise ValueError(f"the stage modules of one rank must be on one device, found {devs}")
        if devs:
            self.device = devs.pop()
        elif torch.cuda.is_available() and dist.get_backend(self.group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")
        backend = dist.get_backend(self.group)
        self.user_group = self.group
        self._store = _transport.group_store(self.group)
        from overlap.partition import nccl_max_ctas_of
        max_ctas = nccl_max_ctas_of(nccl_max_ctas)  # validated on every backend
        # private transports over the same ranks carry the pipeline's traffic (see
        # overlap.connect); NCCL gets two, one per direction (overlap.p2p.P2P)
        self._prefix = _transport.next_prefix(self.group)
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        mode = _transport.transport_mode(transport, backend, self.device)
        # checked before the transports are set up: misuse is refused at once, with
        # nothing to release (the same arguments on every rank raise on every rank)
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 compute action, got {lookahead}")
        self.lookahead = int(lookahead)
        # FSDP2 (fully_shard) reduce-scatters a stage's gradients at the end of each of
        # its backwards: a weight gradient deferred past it would be missed (wrong
        # gradients, silently), so such stages run whole backwards (W is then empty)
        self._whole_backward = tuple(is_fsdp(m) for m in modules)
        if split_linear_weight_grads and any(self._whole_backward):
            raise ValueError("split_linear_weight_grads=True cannot be used with FSDP2-sharded "
                             "stages (fully_shard): FSDP reduce-scatters the gradients when "
                             "a stage's backward ends, before a deferred weight gradient would "
                             "be computed; drop split_linear_weight_grads (their weight "
                             "gradients are then computed in the backward itself)")
        # collective with every rank of the group (PipelineError on every rank if one
        # is missing, fails or exits meanwhile)
        conn = _transport.connect(
            self.group, self._store, self._prefix, backend, self.device, mode, self.rank,
            timeout, max_ctas)
        self.transport = conn.name
        if self.transport == "nccl":
            self._own_nccl_groups(conn.groups)
        else:
            self._pg = conn.groups
        self._open_board(conn.shm, self._store, self._prefix, rank_mapping, timeout)
        if max_ctas is not None and self.transport != "nccl":
            log.info("nccl_max_ctas=%d ignored: this pipeline's transport is %s, not NCCL",
                     max_ctas, self.transport)
        # F&B pairs go through the stage class's overlapped_forward_backward when every
        # stage of this rank is of that class (one stage: a pair of two micro-batches of it)
        self.overlapped_forward_backward = (
            all(type(m) is type(modules[0]) for m in modules)
            and hasattr(type(modules[0]), "overlapped_forward_backward"))
        self.timeout = datetime.timedelta(seconds=float(timeout))
        if split_linear_weight_grads:
            for m in modules:
                _split_linear(m)
        self.record_timeline = record_timeline
        self.confirm_steps = confirm_steps
        self._p2p = conn.transport
        self._plans: dict[tuple, Plan] = {}
        # what crosses each boundary, per (num_chunks, mode, chunk, input signature):
        # the outputs' shapes/dtypes (sent once with the first activation) and which
        # input gradients are None (sent once with the first gradient)
        self._meta_sent: dict[tuple, list[TensorMeta]] = {}
        self._meta_recv: dict[tuple, list[TensorMeta]] = {}
        self._meta_checked: dict[tuple, int] = {}  # declaration version checked against
        self._mask_sent: dict[tuple, tuple] = {}
        self._mask_recv: dict[tuple, tuple | bool] = {}
        self._sig_keys: dict[tuple, None] = {}  # input signatures seen, least recent first
        self._decl_bound: tuple | None = None    # (declaration version, inputs) verified
        self._decl_pending: tuple | None = None
        self._warned_view = False
        #: training/inference steps completed on this rank (dualpipe.training checks that
        #: gradients exist and were reduced for the last one)
        self.steps_done = 0
        self._init_timing(self.device)

    # ------------------------------------------------------------------ helpers
    def _schedule(self, num_chunks: int) -> Schedule:
        if self._stopped is not None:
            err, self._stopped_error = self._stopped_error, None
            if err is not None:  # the last step completed on every rank, then this one failed
                raise err
            raise RuntimeError(self._stopped)
        return get_schedule(self.schedule_name, self.num_ranks, num_chunks)

    def _plan(self, s: Schedule, forward_only: bool) -> Plan:
        key = (s.num_chunks, forward_only)
        p = self._plans.get(key)
        if p is None:
            p = self._plans[key] = compile_plans(s, forward_only, self.lookahead)[self.rank]
        return p

    def _private_stream(self):
        """A context making a private (idle) CUDA stream current; a no-op on CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(device=self.device))

    @property
    def stopped(self) -> str | None:
        """``None`` while the pipeline can step; after a failure or :meth:`close`, why it
        cannot (the message ``step()`` raises)."""
        return self._stopped

    def close(self) -> None:
        """Release this rank's side of the pipeline's transports (idempotent): the
        private NCCL communicators are shut down, the shared-memory rings unmapped, the
        private gloo group dropped.  Call it on every rank after the last step (a
        pipeline that is garbage-collected without it shuts its NCCL communicators down
        then); the pipeline cannot step afterwards.  After a failure (a
        :class:`PipelineError`) this has been done already, with the communicators
        aborted instead."""
        if self._stopped is None:
            self._release(failed=False)
            self._stopped = ("this pipeline was closed (close()); build a new "
                             "DualPipe/DualPipeV to go on")

    # ------------------------------------------------------------------ step
    def step(self, *inputs: torch.Tensor | None, num_chunks: int = 0,
             criterion: Callable[..., torch.Tensor] | None = None,
             labels: Sequence[torch.Tensor | None] = (), return_outputs: bool = False):
        """Run one training step (or, under ``torch.no_grad()``, one inference step).

        Arguments (as in ``deepseek-ai/DualPipe``):
            *inputs: the batch, on the ranks that hold a stream's first stage (rank 0;
                DualPipe also the last rank); split into micro-batches along
                ``batch_dim``; its size must be divisible by the micro-batch count.
                Other ranks pass nothing or ``None`` (as the published examples do).
            num_chunks: micro-batches per step, the same on every rank.
            criterion: ``criterion(*outputs, *labels) -> scalar loss``, on the ranks
                that hold a stream's last stage (DualPipe: first and last rank;
                DualPipeV: rank 0; 1F1B/ZB1P: the last rank).
            labels: a tensor or a tuple/list of tensors: the labels for the
                micro-batches whose loss this rank computes (DualPipe: on rank 0 they
                belong to the last rank's inputs and vice versa).  Ranks without a last
                stage may pass ``criterion`` and ``labels=(None,)`` (ignored, quietly).
            return_outputs: also return the last stage's outputs (concatenated).

        Returns ``(loss, outputs)``: on ranks holding a last stage, ``loss`` is the
        per-micro-batch losses stacked (``float[n]``) when a criterion was given, and
        ``outputs`` the outputs when requested; ``None`` elsewhere.  Gradients are
        accumulated into the modules' ``.grad`` (call ``zero_grad`` between steps).
        """
        t_start = time.perf_counter()
        if self._ev_start is not None:  # CUDA: the device clock's origin for this step
            self._pending = None
            self._ev_start.record(torch.cuda.current_stream(self.device))
        forward_only = not torch.is_grad_enabled()
        err = None
        self._decl_pending = None
        self._arg_sizes = (-1, -1)
        try:
            s = self._schedule(num_chunks) if isinstance(num_chunks, int) else None
            if s is None:
                raise ValueError(f"num_chunks must be an int, got {num_chunks!r}")
            batches, label_mbs = self._check_args(s, inputs, criterion, labels, forward_only)
        except ValueError as e:
            err, s = e, None
        sig = self._handshake(num_chunks, forward_only, return_outputs, err,
                              inputs if err is None else (), s)
        self._remember_signature((num_chunks, forward_only, sig))
        plan = self._plan(s, forward_only)
        try:
            result = StepExecutor(self, s, plan, sig, batches, label_mbs, criterion,
                                  return_outputs, forward_only, t_start).run()
        finally:
            WeightGradStore.enabled = False
            WeightGradStore.cache = []
        if self._decl_pending is not None:  # the declaration held for these inputs
            self._decl_bound = self._decl_pending
        return result
