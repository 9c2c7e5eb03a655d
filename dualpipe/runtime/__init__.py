"""Execute one rank's action list on real modules.

This is the only place that runs F / B / I / W / F&B.  It holds no schedule logic: the
order comes from :func:`dualpipe.schedules.get_schedule` and the sends/receives from
:func:`dualpipe.schedules.lower`, compiled once per (schedule, ranks, chunks, mode) into
a flat list of steps.

Per step: arguments are checked locally, then a handshake (one ``all_gather`` of a few
integers) compares schedule, ``num_chunks``, mode and argument errors across ranks, so
a mismatch or a bad argument on one rank raises on every rank instead of hanging.
Receives are posted ahead of the compute that needs them (``lookahead`` compute
actions) and waited for only when it starts; sends are posted right after the compute
that produced them and waited for at the end of the step.  The shapes and dtypes of
what crosses a boundary are sent once per boundary and input signature, and cached.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import os
import time
import traceback
import warnings
import weakref
import zlib
from bisect import bisect_left
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from overlap.p2p import (META_LEN, P2P, Handle, PeerAborted, PeerError, PeerExited, PeerLost,
                         PeerTimeout, TensorMeta, pack_meta, unpack_meta)
from overlap.shm import DEFAULT_RING_BYTES, ShmP2P, ShmUnavailable

from ..schedules import (B, F, FB, I, RECV_B, RECV_F, SEND_B, SEND_F, W, Action, Schedule,
                        gc_paused, get_schedule, lower, placement_schedule, spec_of)
from ..failures import RECORD_DEADLINE, Record, ShmBoard, StoreBoard, StoreUnresponsive
from ..simulate import Interval
from ..utils import gather, run_backward, scatter
from ..weight_grad import WeightGradStore, split_linear_weight_grads

__all__ = ["PipelineRuntime", "PipelineError", "PipelineTimeout", "StepStats",
           "set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]

log = logging.getLogger(__name__)

_TAG_F, _TAG_B, _TAG_META = 1, 2, 3
_TAG_MASK = 5  # which input gradients are None (4: reduce_dualpipe_grads)
# transport= values -> overlap.shm.ShmP2P.create modes
_TRANSPORTS = {"auto": "auto", "shm": "shm", "group": "off"}


def _ring_bytes() -> int:
    """Shared-memory ring size per rank pair: $DUALPIPE_SHM_RING_BYTES or the default."""
    v = os.environ.get("DUALPIPE_SHM_RING_BYTES", "")
    try:
        return int(v) if v else DEFAULT_RING_BYTES
    except ValueError:
        raise ValueError(f"DUALPIPE_SHM_RING_BYTES must be an integer number of bytes, "
                         f"got {v!r}") from None
_HS_LEN = 12
_AGREEMENT = "end of step (agreement)"
_MAX_SIGNATURES = 64  # input signatures whose boundary shapes a pipeline keeps

_p2p_shapes: list[tuple[int, ...]] | None = None
_p2p_dtype: torch.dtype | None = None
_p2p_version = 0  # bumped by every declaration; a pipeline binds it to the inputs it ran with


def set_p2p_tensor_shapes(shapes: Sequence[Sequence[int]] | None) -> None:
    """Declare the shapes of the tensors crossing every stage boundary (optional).

    Not needed: shapes are exchanged automatically.  When given, every boundary's
    tensors are checked against them and a mismatch raises ``ValueError``.  A
    declaration holds for the step inputs it was first used with: a later step whose
    inputs differ in shape or dtype (a new sequence length, another batch size) is
    refused at its start, on every rank, until shapes are declared again (or cleared
    with ``set_p2p_tensor_shapes(None)``)."""
    global _p2p_shapes, _p2p_version
    _p2p_shapes = None if shapes is None else [tuple(int(d) for d in s) for s in shapes]
    _p2p_version += 1


def set_p2p_tensor_dtype(dtype: torch.dtype | None) -> None:
    """Declare the dtype of the floating-point tensors crossing stage boundaries
    (optional, checked; ``None`` clears it).  Like the shapes, it holds for the input
    dtypes of the first step that uses it."""
    global _p2p_dtype, _p2p_version
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ValueError(f"set_p2p_tensor_dtype expects a torch.dtype, got {dtype!r}")
    _p2p_dtype = dtype
    _p2p_version += 1


class PipelineError(RuntimeError):
    """A step failed; every rank of the pipeline raises it, with the same message.

    ``rank`` and ``action``: where *this* rank stopped.  ``failed_rank``: the pipeline
    rank where the failure began -- the rank whose code raised first, the rank whose
    process died, or the rank that stopped answering -- or ``None`` when no rank can
    tell (for example a handshake that timed out while every rank was responsive)."""

    def __init__(self, msg: str, rank: int | None = None, action: str | None = None,
                 failed_rank: int | None = None):
        self.rank, self.action, self.failed_rank = rank, action, failed_rank
        super().__init__(msg)


class PipelineTimeout(PipelineError):
    """A rank stopped answering: a peer did not send or receive within the timeout
    (``failed_rank`` names the rank that is not responding when it can be told)."""


@dataclass
class StepStats:
    """Measured figures of the last step on this rank (seconds).

    ``wall``: the step's duration; ``busy``: the sum of its compute actions (F, B, I,
    W, F&B); ``wait``: the sum of its waits on receives; ``idle = wall - busy``.  One
    clock for all three and for :attr:`PipelineRuntime.timeline`: the host clock on CPU,
    the device clock on CUDA (see :class:`PipelineRuntime`).
    """

    wall: float = 0.0
    busy: float = 0.0
    wait: float = 0.0
    peak_activations: int = 0
    num_compute: int = 0

    @property
    def idle(self) -> float:
        return self.wall - self.busy


@dataclass
class _Plan:
    """One rank's compiled step: compute ops, receives in posting order, and for each
    receive the sends that are provably complete once it has arrived."""

    ops: list[tuple] = field(default_factory=list)
    # ops[i] = (kind, c, m, c2, m2, need, sends, post_upto, text)
    #   need: tuple of receive indices this op waits for
    #   sends: tuple of (kind, chunk, mb, peer, send id)
    #   post_upto: receives with index < post_upto may be posted before op i runs
    recvs: list[tuple] = field(default_factory=list)  # (kind, chunk, mb, peer)
    release: list[tuple] = field(default_factory=list)  # per receive: send ids to reap


def _compile_rank(s: Schedule, rank: int, forward_only: bool, lookahead: int) -> _Plan:
    low = lower(s)[rank]
    plan = _Plan()
    recv_index: dict[tuple, int] = {}
    raw = []
    nsend = 0
    for a in low:
        if forward_only and a.kind in (RECV_B, SEND_B, B, I, W):
            continue
        if a.kind in (RECV_F, RECV_B):
            key = (F if a.kind == RECV_F else B, a.chunk, a.mb)
            recv_index[key] = len(plan.recvs)
            plan.recvs.append((key[0], a.chunk, a.mb, a.peer))
        elif a.kind in (SEND_F, SEND_B):
            raw[-1][1].append((F if a.kind == SEND_F else B, a.chunk, a.mb, a.peer, nsend))
            nsend += 1
        else:
            if forward_only and a.kind == FB:
                a = Action(F, a.chunk, a.mb)
            raw.append((a, [], len(plan.recvs)))
    for i, (a, sends, nrecv_before) in enumerate(raw):
        need = tuple(recv_index[(F if k == F else B, c, m)] for k, c, m in a.parts()
                     if k != W and (F if k == F else B, c, m) in recv_index)
        j = min(i + lookahead, len(raw) - 1)
        post_upto = raw[j][2] if j > i else nrecv_before
        post_upto = max(post_upto, max(need) + 1 if need else 0)
        plan.ops.append((a.kind, a.chunk, a.mb, a.chunk2, a.mb2, need, tuple(sends),
                         post_upto, str(a)))
    plan.release = [() for _ in plan.recvs]
    return plan


@lru_cache(maxsize=32)
@gc_paused()
def _compile(s: Schedule, forward_only: bool, lookahead: int) -> tuple[_Plan, ...]:
    """Every rank's plan, with release points for sends.

    A send's buffer may be released once the transfer is complete, but gloo reports
    a send complete only when it is waited for, and waiting early could block on a
    receiver that has not posted the receive yet.  Every rank knows every rank's plan,
    so for the k-th message from r to X we find the first message X sends back to r
    after the operation on X that consumed message k: once r has received that one,
    X had received message k, and r's wait on the send returns at once.  Sends with
    no such message are reaped at the end of the step."""
    plans = [_compile_rank(s, r, forward_only, lookahead) for r in range(s.num_ranks)]
    # per rank: the receive indices from each peer, in channel order, and consumers
    recv_seq = []
    consumer = []
    for plan in plans:
        by_peer: dict[int, list[int]] = {}
        for j, (_k, _c, _m, peer) in enumerate(plan.recvs):
            by_peer.setdefault(peer, []).append(j)
        recv_seq.append(by_peer)
        cons = [0] * len(plan.recvs)
        for i, op in enumerate(plan.ops):
            for j in op[5]:
                cons[j] = i
        consumer.append(cons)
    # per rank: for each peer, the op index of every send to it, in order
    send_ops = []
    for plan in plans:
        by_peer = {}
        for i, op in enumerate(plan.ops):
            for (_k, _c, _m, peer, _sid) in op[6]:
                by_peer.setdefault(peer, []).append(i)
        send_ops.append(by_peer)
    for r, plan in enumerate(plans):
        release: list[list[int]] = [[] for _ in plan.recvs]
        sent_to: dict[int, int] = {}
        for op in plan.ops:
            for (_k, _c, _m, x, sid) in op[6]:
                k = sent_to.get(x, 0)
                sent_to[x] = k + 1
                jx = recv_seq[x][r][k]          # X's receive of this message
                c = consumer[x][jx]             # X's op that consumed it
                back_ops = send_ops[x].get(r, [])
                back = bisect_left(back_ops, c)  # messages X sent to r before op c
                if back < len(back_ops):        # X sends r one more at or after op c
                    release[recv_seq[r][x][back]].append(sid)
        plan.release = [tuple(x) for x in release]
    return tuple(plans)


def _stage_modules(modules, want: int, name: str) -> tuple[nn.Module, ...]:
    """This rank's stage modules from what the user passed.

    As in ``deepseek-ai/DualPipe`` (which wraps ``modules`` in ``nn.ModuleList``), the
    stages may come as a tuple, a list, an ``nn.ModuleList`` or an ``nn.Sequential``.  A
    schedule with one stage per rank also takes the stage itself; there an
    ``nn.Sequential`` is that one stage (it is callable), while an ``nn.ModuleList``
    (which is not) is a container."""
    if isinstance(modules, nn.ModuleList) or (isinstance(modules, nn.Sequential) and want > 1):
        stages = tuple(modules)
        what = f"an nn.{type(modules).__name__} of {len(stages)} module(s)"
    elif isinstance(modules, nn.Module):
        stages = (modules,)
        what = f"one {type(modules).__name__}"
    elif isinstance(modules, (tuple, list)):
        stages = tuple(modules)
        what = f"a {type(modules).__name__} of {[type(m).__name__ for m in stages]}"
    else:
        raise ValueError(f"modules must be nn.Module stages (a tuple, list, nn.ModuleList or "
                         f"nn.Sequential of them), got {type(modules).__name__}")
    if len(stages) != want or not all(isinstance(m, nn.Module) for m in stages):
        raise ValueError(f"schedule {name!r} needs {want} nn.Module stage(s) per rank "
                         f"({'stage r and its partner stage' if want == 2 else 'the stage'}), "
                         f"got {what}")
    from torch.nn.parallel import DistributedDataParallel
    if any(isinstance(x, DistributedDataParallel) for m in stages for x in m.modules()):
        raise ValueError("a stage is wrapped in DistributedDataParallel, which reduces "
                         "gradients inside every backward; a pipeline runs one backward per "
                         "micro-batch (split into input- and weight-gradient parts): pass the "
                         "plain stage and call dualpipe.all_reduce_grads(pipe, dp_group) after "
                         "step(), or shard the stage with FSDP2's fully_shard (docs/training.md)")
    return stages


def _as_tuple(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return (x,)
    if isinstance(x, (tuple, list)):
        return tuple(x)
    raise TypeError(f"a pipeline stage must return a Tensor or a tuple/list of Tensors, "
                    f"got {type(x).__name__}")


def _pack_mask(mask: tuple, device) -> torch.Tensor:
    """``int64[META_LEN]``: ``[n, 1 if gradient i is there else 0, ...]``."""
    if len(mask) >= META_LEN:
        raise ValueError(f"a stage boundary carries {len(mask)} tensors that need a gradient; "
                         f"at most {META_LEN - 1} fit")
    out = torch.zeros(META_LEN, dtype=torch.int64)
    out[0] = len(mask)
    out[1: 1 + len(mask)] = torch.tensor([int(b) for b in mask], dtype=torch.int64)
    return out.to(device)


def _unpack_mask(t: torch.Tensor) -> tuple | bool:
    """The mask of :func:`_pack_mask`; ``True`` when every gradient is there."""
    words = t.tolist()
    mask = tuple(bool(w) for w in words[1: 1 + words[0]])
    return True if all(mask) else mask


def _mask_text(mask: tuple) -> str:
    return "[" + ", ".join("grad" if b else "None" for b in mask) + "]"


def _has_tensor(x) -> bool:
    """``x`` (a tensor, or a tuple/list that may hold ``None``) holds a tensor."""
    if isinstance(x, torch.Tensor):
        return True
    return isinstance(x, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in x)


def _sig(tensors: Sequence[Any]) -> str:
    return ";".join(f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else "None"
                    for t in tensors)


class PipelineRuntime(nn.Module):
    """Run any schedule of :mod:`dualpipe.schedules` over ``modules`` on this rank.

    Users normally construct :class:`dualpipe.DualPipe`, :class:`dualpipe.DualPipeV` or
    :class:`dualpipe.Pipeline`; see those for the arguments.

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
        self._stopped_error: PipelineError | None = None  # raised by the next step
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
        modules = _stage_modules(modules, placed.stages_per_rank, name)
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
        self._to_group = [0] * self.num_ranks
        for g, p in enumerate(rank_mapping):
            self._to_group[p] = g
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
        self._store = _group_store(self.group)
        from overlap.partition import nccl_max_ctas_of
        max_ctas = nccl_max_ctas_of(nccl_max_ctas)  # validated on every backend
        # Private transports over the same ranks carry the pipeline's traffic: shared
        # memory when every rank is on this host (overlap.shm), else a private backend.  On a
        # failure the runtime drops them, which closes their connections so every rank
        # stops at once, while the user's group (and the store rank 0 hosts) stays
        # usable.  Their store prefix is unique per pipeline built on this group (ranks
        # build pipelines in the same order).  NCCL gets two, one per direction (see
        # overlap.p2p.P2P).
        gname = str(getattr(self.group, "group_name", "") or "default")
        n = _clone_count[gname] = _clone_count.get(gname, 0) + 1
        self._prefix = f"dualpipe/{gname}/{n}"
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        to = datetime.timedelta(seconds=float(timeout))
        mode = transport
        if mode == "auto":
            mode = os.environ.get("DUALPIPE_TRANSPORT", "auto") or "auto"
        if mode not in _TRANSPORTS:
            raise ValueError(f"transport must be one of {list(_TRANSPORTS)}, got {mode!r}"
                             + ("" if transport == mode else " (from $DUALPIPE_TRANSPORT)"))
        if mode == "shm" and (backend != "gloo" or self.device.type != "cpu"):
            raise ValueError(f"transport='shm' moves CPU tensors between processes of one "
                             f"host; this pipeline uses {backend} with stages on "
                             f"{self.device}: use transport='auto' or 'group'")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError("the process group uses NCCL but the stage modules are on "
                             f"{self.device}; move them to the rank's GPU")
        if backend == "gloo" and self.device.type == "cuda":
            raise ValueError("gloo cannot send CUDA tensors between ranks: use an NCCL "
                             "process group for modules on GPUs")
        # checked before the transports are set up: misuse is refused at once, with
        # nothing to release (the same arguments on every rank raise on every rank)
        if lookahead < 1:
            raise ValueError(f"lookahead must be >= 1 compute action, got {lookahead}")
        self.lookahead = int(lookahead)
        # FSDP2 (fully_shard) reduce-scatters a stage's gradients at the end of each of
        # its backwards: a weight gradient deferred past it would be missed (wrong
        # gradients, silently), so such stages run whole backwards (W is then empty)
        self._whole_backward = tuple(_is_fsdp(m) for m in modules)
        if split_linear_weight_grads and any(self._whole_backward):
            raise ValueError("split_linear_weight_grads=True cannot be used with FSDP2-sharded "
                             "stages (fully_shard): FSDP reduce-scatters the gradients when "
                             "a stage's backward ends, before a deferred weight gradient would "
                             "be computed; drop split_linear_weight_grads (their weight "
                             "gradients are then computed in the backward itself)")
        shm = None
        # collective with every rank of the group: a rank that never builds this
        # pipeline, builds pipelines in another order, or fails or exits meanwhile makes
        # the others raise PipelineError here (PipelineTimeout after `timeout`), never a
        # transport's or the store's own exception
        try:
            if backend == "gloo" and self.device.type == "cpu" and self._store is not None:
                # collective: every rank agrees on shared memory (all on one host, extension
                # built) or on the private gloo group below
                try:
                    shm = ShmP2P.create(self._store, self._prefix, self.group.rank(),
                                        self.num_ranks, mode=_TRANSPORTS[mode], timeout=timeout,
                                        ring_bytes=_ring_bytes())
                except ShmUnavailable as e:
                    raise ValueError(str(e)) from e
            if shm is not None:
                self.transport = "shm"
            elif backend == "gloo":
                self.transport = "gloo"
                self._pg = dist.ProcessGroupGloo(dist.PrefixStore(self._prefix, self._store),
                                                 self.group.rank(), self.num_ranks, to)
            elif backend == "nccl":  # unverified: no GPU has run this path yet
                self.transport = "nccl"
                # the communicators' watchdog is a backstop behind the host-side deadlines
                # (overlap.p2p.Handle): twice the timeout, so that a hang is reported as a
                # PipelineTimeout on every rank, not by the watchdog tearing a process down
                self._own_nccl_groups(_nccl_groups(self._store, self._prefix, self.group.rank(),
                                                   self.num_ranks, 2 * to, max_ctas))
            else:  # another backend: the user's group carries the traffic itself
                self.transport = str(backend)
        except (ValueError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - another rank is missing, gone or failed
            raise _setup_error(e, self.rank, self.num_ranks, timeout) from e
        # where a failure is recorded for every rank to read (dualpipe.failures)
        if shm is not None:
            self._board = ShmBoard(shm, rank_mapping)
        elif self._store is not None:
            try:
                self._board = StoreBoard(self._store, self._prefix, self.rank, self.num_ranks,
                                         _store_host(self.group, rank_mapping), timeout)
            except StoreUnresponsive as e:
                self._release(failed=True)
                raise PipelineTimeout(f"building the pipeline on pipeline rank {self.rank}: the "
                                      f"process group's store did not answer within {timeout:g} "
                                      "s (its host, global rank 0, is stopped or hung)",
                                      self.rank, "construction", 0) from e
            weakref.finalize(self, self._board.close)
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
                split_linear_weight_grads_fn(m)
        self.record_timeline = record_timeline
        self.confirm_steps = confirm_steps
        if shm is not None:
            self._p2p = shm
        else:
            self._p2p = P2P(self.group) if self._pg is None else \
                P2P(backend=self._pg, rank=self.group.rank())
        self._plans: dict[tuple, _Plan] = {}
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
        self._times: list[tuple] = []
        self._last_stats = StepStats()
        #: training/inference steps completed on this rank (dualpipe.training checks that
        #: gradients exist and were reduced for the last one)
        self.steps_done = 0
        self._pending: _DeviceStep | None = None  # CUDA: events of the last step, unread
        self._events: list = []
        self._ev_start = torch.cuda.Event(enable_timing=True) \
            if self.device.type == "cuda" else None

    # ------------------------------------------------------------------ helpers
    def _schedule(self, num_chunks: int) -> Schedule:
        if self._stopped is not None:
            err, self._stopped_error = self._stopped_error, None
            if err is not None:  # the last step completed on every rank, then this one failed
                raise err
            raise RuntimeError(self._stopped)
        return get_schedule(self.schedule_name, self.num_ranks, num_chunks)

    def _plan(self, s: Schedule, forward_only: bool) -> _Plan:
        key = (s.num_chunks, forward_only)
        p = self._plans.get(key)
        if p is None:
            p = self._plans[key] = _compile(s, forward_only, self.lookahead)[self.rank]
        return p

    @property
    def timeline(self) -> list[Interval]:
        """The last step's intervals on this rank, seconds from the step's start
        (lane ``compute`` for F/B/I/W/F&B, lane ``wait`` for waits on receives), on the
        clock described in the class docstring."""
        if self._pending is not None:
            self._resolve()
        return [Interval(self.rank, a, b, act, lane) for (a, b, act, lane) in self._times]

    @property
    def last_stats(self) -> StepStats:
        """:class:`StepStats` of the last successful step on this rank."""
        if self._pending is not None:
            self._resolve()
        return self._last_stats

    def _resolve(self) -> None:
        """Read the last step's CUDA events (waits for its last one)."""
        p, self._pending = self._pending, None
        spans, wall, busy, wait = _on_device_clock(p.start, p.end, p.spans)
        self._last_stats = StepStats(wall=wall, busy=busy, wait=wait,
                                     peak_activations=p.peak, num_compute=p.num_compute)
        self._times = [(a, b, _parse_cached(t), lane) for (a, b, t, lane) in spans] \
            if p.record else []

    def _take_events(self, n: int) -> list:
        """``n`` timing events, reused from step to step (grown as needed)."""
        while len(self._events) < n:
            self._events.append(torch.cuda.Event(enable_timing=True))
        return self._events

    def _private_stream(self):
        """A context making a private (idle) CUDA stream current; a no-op on CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.stream(torch.cuda.Stream(device=self.device))

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
            result = self._run(s, plan, sig, batches, label_mbs, criterion, return_outputs,
                               forward_only, t_start)
        finally:
            WeightGradStore.enabled = False
            WeightGradStore.cache = []
        if self._decl_pending is not None:  # the declaration held for these inputs
            self._decl_bound = self._decl_pending
        return result

    def _remember_signature(self, key: tuple) -> None:
        """Keep what crossed the boundaries for the last _MAX_SIGNATURES input signatures
        (a new sequence length is a new signature).  Every rank sees the same sequence of
        keys (the handshake agrees on them), so every rank forgets the same entries."""
        keys = self._sig_keys
        if key in keys:
            del keys[key]
        keys[key] = None
        if len(keys) > _MAX_SIGNATURES:
            old = next(iter(keys))
            del keys[old]
            for d in (self._meta_sent, self._meta_recv, self._meta_checked, self._mask_sent,
                      self._mask_recv):
                for k in [k for k in d if (k[0], k[1], k[3]) == old]:
                    del d[k]

    def _check_args(self, s: Schedule, inputs, criterion, labels, forward_only):
        r = self.rank
        c_in, c_loss = s.input_chunk(r), s.loss_chunk(r)
        batches = {}
        in_size = -1
        if c_in is not None:
            if not inputs or all(x is None for x in inputs):
                raise ValueError(f"pipeline rank {r} holds the first stage of a stream: pass the "
                                 "batch as step(*inputs, ...) on this rank")
            for x in inputs:
                if x is not None and not isinstance(x, torch.Tensor):
                    raise ValueError(f"step() inputs must be tensors, got {type(x).__name__}")
            batches[c_in] = self._split(inputs, len(s.input_microbatches(r)), "inputs")
            self._check_declaration(inputs)
            in_size = self._batch_size(inputs)
        elif inputs and any(x is not None for x in inputs):
            warnings.warn(f"pipeline rank {r} holds no first stage: its step() inputs are "
                          "ignored", stacklevel=3)
        label_mbs = {}
        label_size = -1
        if c_loss is not None:
            if criterion is None and not forward_only:
                raise ValueError(f"pipeline rank {r} holds the last stage of a stream: pass "
                                 "criterion=... to step() on this rank to train")
            if criterion is not None:
                n = len(s.loss_microbatches(r))
                labels = (labels,) if isinstance(labels, torch.Tensor) else tuple(labels)
                label_mbs[c_loss] = self._split(labels, n, "labels") if labels else [()] * n
                label_size = self._batch_size(labels)
        elif _has_tensor(labels):
            # the published examples pass criterion= and labels=(None,) on every rank:
            # only labels that are really there are worth a word
            warnings.warn(f"pipeline rank {r} holds no last stage: its step() labels are "
                          "ignored", stacklevel=3)
        self._arg_sizes = (in_size, label_size)
        return batches, label_mbs

    def _batch_size(self, xs) -> int:
        """The batch size (along batch_dim) of step() inputs or labels, -1 when none of
        them has that dimension; refused when they disagree (each would be split into
        micro-batches of another size)."""
        d = self.batch_dim
        sizes = {x.shape[d] for x in xs if isinstance(x, torch.Tensor) and x.dim() > d}
        if len(sizes) > 1:
            raise ValueError(f"step() tensors of one argument have different batch sizes "
                             f"{sorted(sizes)} along batch_dim={d}: every input (and every "
                             "label) tensor is split into the same micro-batches, so they "
                             "must have the same size there")
        return sizes.pop() if sizes else -1

    def _check_declaration(self, inputs) -> None:
        """Refuse a step whose inputs differ from those that a set_p2p_tensor_shapes/dtype
        declaration was first used with (checked where the inputs are, before the step's
        handshake, so every rank stops at the start instead of one failing mid-step)."""
        self._decl_pending = None
        if _p2p_shapes is None and _p2p_dtype is None:
            return
        if _p2p_shapes is not None:
            sig = _sig(inputs)
        else:  # a dtype alone says nothing about shapes
            sig = ";".join(str(t.dtype) if isinstance(t, torch.Tensor) else "None"
                           for t in inputs)
        bound = self._decl_bound
        if bound is not None and bound[0] == _p2p_version:
            if bound[1] != sig:
                what = (f"shapes {[list(x) for x in _p2p_shapes]}" if _p2p_shapes is not None
                        else f"dtype {_p2p_dtype}")
                raise ValueError(
                    f"set_p2p_tensor_shapes/dtype declared the boundary {what} for step inputs "
                    f"{bound[1]}, but this step's inputs are {sig}, which changes what crosses "
                    "the stage boundaries: declare the new shapes (set_p2p_tensor_shapes) "
                    "before this step, or call set_p2p_tensor_shapes(None) and "
                    "set_p2p_tensor_dtype(None) to let the pipeline exchange them itself")
            return
        self._decl_pending = (_p2p_version, sig)  # bound once a step has run with it

    def _split(self, xs, n: int, what: str) -> list[tuple]:
        d = self.batch_dim
        for x in xs:
            if x is None:
                continue
            if x.dim() <= d:
                raise ValueError(f"step() {what}: a tensor of shape {list(x.shape)} has no "
                                 f"batch dimension {d}")
            if x.shape[d] == 0:
                raise ValueError(f"step() {what}: batch size 0 (dim {d}, a tensor of shape "
                                 f"{list(x.shape)}): an empty batch gives empty micro-batches, "
                                 "whose losses are NaN; pass at least one sample per "
                                 f"micro-batch ({n} here), or skip the step on every rank")
            if x.shape[d] % n:
                raise ValueError(f"step() {what}: batch size {x.shape[d]} (dim {d}) is not "
                                 f"divisible into {n} micro-batches; make it a multiple of {n}")
            if x.device != self.device:
                raise ValueError(f"step() {what} are on {x.device} but the stages are on "
                                 f"{self.device}: move them first")
        # each micro-batch is made contiguous (a no-op for slices along dim 0 of a
        # contiguous batch), so strided inputs compute exactly what contiguous ones do
        return [tuple(None if t is None else t.contiguous() for t in mb)
                for mb in scatter(xs, n, d)]

    def _handshake(self, num_chunks, forward_only, return_outputs, err, inputs,
                   s: Schedule | None = None) -> tuple:
        hs = torch.zeros(_HS_LEN, dtype=torch.int64)
        hs[0] = 0x4450
        hs[1] = zlib.crc32(self.schedule_name.encode()) & 0x7FFFFFFF
        hs[2] = num_chunks if isinstance(num_chunks, int) else -1
        hs[3] = int(forward_only)
        hs[4] = int(return_outputs)
        hs[5] = 0 if err is None else 1
        hs[6] = zlib.crc32(_sig(inputs).encode()) if inputs else 0
        hs[7] = self.rank
        hs[8], hs[9] = self._arg_sizes if err is None else (-1, -1)
        try:
            # CUDA: on a private stream, so neither the copy nor the collective queues
            # behind the previous step's work on the current stream
            with self._private_stream():
                out = self._p2p.all_gather(hs.to(self.device), self.num_ranks,
                                           "step handshake").wait(
                    self.timeout, self._abort, host=True)
        except PeerError as e:
            if isinstance(e, PeerTimeout):
                e = PeerTimeout(f"the step-start handshake timed out after "
                                f"{self.timeout.total_seconds():g} s: some rank did not call "
                                "step()", -1, "handshake")
            raise self._failed(e, "handshake", e.__traceback__) from e
        rows = [t.tolist() for t in out]
        if err is not None:
            raise err
        bad = [row[7] for row in rows if row[5]]
        if bad:
            raise ValueError(f"pipeline rank(s) {bad} rejected their step() arguments (see the "
                             "error on those ranks); every rank stops this step")
        for idx, what in ((1, "schedule"), (2, "num_chunks"), (3, "grad mode (training vs "
                          "torch.no_grad inference)"), (4, "return_outputs")):
            vals = [row[idx] for row in rows]
            if len(set(vals)) > 1:
                per = ", ".join(f"rank {row[7]}: {v}" for row, v in zip(rows, vals))
                raise ValueError(f"step() called with different {what} across pipeline ranks "
                                 f"({per}); call it identically on every rank")
        if s is not None:
            self._check_label_sizes(s, rows)
        return tuple(row[6] for row in rows)

    def _check_label_sizes(self, s: Schedule, rows: list) -> None:
        """Labels hold one entry per input sample (split along batch_dim like the
        inputs): compare each rank's labels with the inputs of the stream whose loss it
        computes, which may be on another rank (DualPipe: rank 0's labels belong to the
        last rank's inputs; 1F1B: the last rank's to rank 0's).  Every rank has every
        rank's sizes from the handshake and finds the same answer, so all refuse the
        step together, before anything ran (torch would otherwise broadcast a label
        batch of 1 with only a warning)."""
        pairs = self._label_pairs.get(s.num_chunks)
        if pairs is None:  # (loss rank, its stream's input rank), once per schedule
            pairs = self._label_pairs[s.num_chunks] = tuple(
                (r, s.stage_owner[(s.placement[r][c][0], 0)][0])
                for r in range(self.num_ranks) if (c := s.loss_chunk(r)) is not None)
        d, to_group = self.batch_dim, self._to_group
        for r, q in pairs:
            labels, n = rows[to_group[r]][9], rows[to_group[q]][8]
            if labels < 0:
                continue
            if n >= 0 and n != labels:
                where = f"pipeline rank {q}" + (", the same rank" if q == r else "")
                raise ValueError(
                    f"step() labels on pipeline rank {r} have batch size {labels} (dim {d}) "
                    f"but the inputs they belong to ({where}) have batch size {n}: pass one "
                    "label per input sample, split along batch_dim like the inputs"
                    + (" (DualPipe: each end rank passes the labels of the other end's "
                       "inputs)" if q != r and self.schedule_name == "dualpipe" else ""))

    # ------------------------------------------------------------------ the loop
    def _run(self, s: Schedule, plan: _Plan, sig, batches, label_mbs, criterion,
             return_outputs, forward_only, t_start):
        rank = self.rank
        placement = s.placement[rank]
        nstages = [s.streams[st].num_stages for st, _ in placement]
        owner = s.stage_owner
        modules = self.module
        # local hand-offs (two chunks of this rank adjacent in a stream)
        next_local = []
        prev_local = []
        for c, (st, stage) in enumerate(placement):
            nxt = owner.get((st, stage + 1))
            prv = owner.get((st, stage - 1))
            next_local.append(nxt[1] if nxt and nxt[0] == rank else None)
            prev_local.append(prv[1] if prv and prv[0] == rank else None)
        is_first = [stage == 0 for _, stage in placement]
        is_last = [stage == nstages[c] - 1 for c, (_, stage) in enumerate(placement)]
        nmb = [s.streams[st].num_microbatches for st, _ in placement]
        nchunk = len(placement)
        inputs = [[None] * nmb[c] for c in range(nchunk)]
        outputs = [[None] * nmb[c] for c in range(nchunk)]
        out_grads = [[None] * nmb[c] for c in range(nchunk)]
        losses = [[None] * nmb[c] for c in range(nchunk)]
        kept_outputs = [[None] * nmb[c] for c in range(nchunk)]
        wgrads: dict[tuple[int, int], list] = {}
        for c, mbs in batches.items():
            inputs[c] = list(mbs)
        recv_handles: list[Handle | None] = [None] * len(plan.recvs)
        meta_handles: dict[tuple, Handle] = {}  # (F|B, chunk) -> shape or gradient layout
        send_handles: list[Handle] = []       # shape messages; reaped at the end
        pending: dict[int, Handle] = {}        # send id -> data send not yet reaped
        release = plan.release
        timeout = self.timeout
        p2p = self._p2p
        to_group = self._to_group
        times: list[tuple] = []
        record = self.record_timeline
        # one clock (see the class docstring): the host's on CPU; on CUDA every interval
        # is a pair of events on the current stream, read when the stats are accessed
        device_clock = self._ev_start is not None
        # NCCL: a failure elsewhere need not end this host-side wait (an aborted peer's
        # transfers just never arrive), so poll the failure record; gloo's receives end
        # when the failing rank drops its connections (and report completion only once
        # waited for, so they cannot be polled)
        meta_abort = self._abort if self.transport == "nccl" else None
        if device_clock:  # the stream the stages' kernels go to (the device's current one)
            stream = torch.cuda.current_stream(self.device)
            take = iter(self._take_events(2 * (len(plan.ops) + len(plan.recvs)) + 1)).__next__
            spans: list[tuple] = []
        clock = time.perf_counter
        live = peak = 0
        posted = 0
        recvs = plan.recvs
        busy = wait_total = 0.0
        training = not forward_only
        meta_sent = self._meta_sent
        meta_recv = self._meta_recv
        mask_sent = self._mask_sent
        mask_recv = self._mask_recv
        meta_checked = self._meta_checked

        def meta_key(c):
            return (s.num_chunks, forward_only, c, sig)

        def post_until(limit: int) -> None:
            nonlocal posted
            while posted < limit:
                kind, c, m, peer = recvs[posted]
                if kind == F:
                    metas = meta_recv.get(meta_key(c))
                    if metas is None:
                        if (F, c) not in meta_handles:
                            buf = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
                            meta_handles[(F, c)] = p2p.irecv([buf], to_group[peer],
                                                             f"shapes for F{c}.{m}", _TAG_META)
                        return
                    bufs = [torch.empty(mt.shape, dtype=mt.dtype, device=self.device)
                            for mt in metas]
                    what = f"activation for F{c}.{m}"
                    tag = _TAG_F
                else:
                    metas = meta_sent.get(meta_key(c))
                    if metas is None:  # first step: shapes known once F{c} has run
                        return
                    if meta_key(c) not in mask_recv:  # which gradients are None: once
                        if (B, c) not in meta_handles:
                            buf = torch.empty(META_LEN, dtype=torch.int64, device=self.device)
                            meta_handles[(B, c)] = p2p.irecv(
                                [buf], to_group[peer], f"gradient layout for B{c}.{m}",
                                _TAG_MASK)
                        return
                    bufs = [torch.empty(mt.shape, dtype=mt.dtype, device=self.device)
                            for mt in metas if mt.requires_grad]
                    what = f"gradient for B{c}.{m}"
                    tag = _TAG_B
                recv_handles[posted] = p2p.irecv(bufs, to_group[peer], what, tag)
                posted += 1

        def wait_recv(idx: int, text: str) -> list[torch.Tensor]:
            nonlocal wait_total
            while recv_handles[idx] is None:  # posting stopped at a shape message
                kind, c, m, peer = recvs[posted]
                h = meta_handles.pop((kind, c), None)
                if h is not None:  # the host needs the shapes to allocate the buffers
                    buf = h.wait(timeout, meta_abort, host=True)[0]
                    if kind == F:
                        meta_recv[meta_key(c)] = unpack_meta(buf)
                    else:
                        mask_recv[meta_key(c)] = _unpack_mask(buf)
                before = posted
                post_until(idx + 1)
                if posted == before and h is None and (kind, c) not in meta_handles:
                    raise PipelineError(f"pipeline rank {rank}, action {text}: internal error: "
                                        f"cannot post receive {recvs[posted]}", rank, text)
            h = recv_handles[idx]
            recv_handles[idx] = None
            # no is_completed() probe first: gloo reports a receive complete only once
            # it has been waited for, so the probe would be one more call per receive
            if device_clock:  # NCCL: the wait is the stream's stall between two events
                e0 = take()
                e0.record(stream)
                tensors = h.wait(timeout)
                e1 = take()
                e1.record(stream)
                spans.append((e0, e1, text, "wait"))
                return tensors
            t0 = clock()
            tensors = h.wait(timeout)
            t1 = clock()
            wait_total += t1 - t0
            if record:
                times.append((t0 - t_start, t1 - t_start, text, "wait"))
            return tensors

        def send(kind, c, m, peer, sid, tensors, text, like=()):
            if kind == F:
                metas = [TensorMeta.of(t) for t in tensors]
                key = meta_key(c)
                known = meta_sent.get(key)
                if known is None:
                    self._check_declared(metas)
                    meta_sent[key] = metas
                    meta_checked[key] = _p2p_version
                    send_handles.append(p2p.isend([pack_meta(metas, self.device)],
                                                  to_group[peer], f"shapes of {text}", _TAG_META))
                elif known != metas:
                    raise PipelineError(
                        f"pipeline rank {rank}, action {text}: stage output changed from "
                        f"{[str(x) for x in known]} to {[str(x) for x in metas]} for the same "
                        "inputs; every micro-batch must produce the same shapes/dtypes",
                        rank, text)
                elif meta_checked[key] != _p2p_version:  # declared anew since: check again
                    self._check_declared(metas)
                    meta_checked[key] = _p2p_version
                h = p2p.isend(tensors, to_group[peer], f"send {text}", _TAG_F)
            else:
                # tensors: this stage's input gradients, None where no gradient reached
                # an input (a single process leaves the earlier stages' .grad None then);
                # which ones are None is sent once per signature, zeros stand in for them
                mask = tuple(g is not None for g in tensors)
                key = meta_key(c)
                known = mask_sent.get(key)
                if known is None:
                    mask_sent[key] = mask
                    send_handles.append(p2p.isend([_pack_mask(mask, self.device)],
                                                  to_group[peer], f"gradient layout of {text}",
                                                  _TAG_MASK))
                elif known != mask:
                    raise PipelineError(
                        f"pipeline rank {rank}, action {text}: which input gradients are None "
                        f"changed from {_mask_text(known)} to {_mask_text(mask)} for the same "
                        "inputs; every micro-batch of a step must use its stage inputs the "
                        "same way (a gradient that is None for one must be None for all)",
                        rank, text)
                if not all(mask):
                    tensors = [g if g is not None else torch.zeros_like(t)
                               for g, t in zip(tensors, like)]
                h = p2p.isend(tensors, to_group[peer], f"send {text}", _TAG_B)
            pending[sid] = h

        def forward(c, m, text):
            ins = inputs[c][m]
            if ins is None:
                raise PipelineError(f"pipeline rank {rank}, action {text}: no input", rank, text)
            out = _as_tuple(modules[c](*ins))
            loss = None
            if is_last[c] and criterion is not None:
                loss = criterion(*out, *label_mbs[c][m])
                losses[c][m] = loss
            return out, loss

        def after_forward(c, m, out, text, sends):
            nonlocal live, peak
            if training:
                live += 1
                if live > peak:
                    peak = live
            if is_last[c]:
                if return_outputs:
                    kept_outputs[c][m] = tuple(t.detach() for t in out)
                if training:
                    outputs[c][m] = out
                else:
                    inputs[c][m] = None
                return
            nl = next_local[c]
            if nl is not None:
                inputs[nl][m] = tuple(t.detach().requires_grad_(t.requires_grad and training)
                                      for t in out)
            if training:
                outputs[c][m] = out
            else:
                inputs[c][m] = None
            for (k, sc, sm, peer, sid) in sends:
                if k == F and sc == c:
                    send(F, c, m, peer, sid, out, text)
                    if training:
                        release_sent(c, m, out)

        def release_sent(c, m, out):
            """Release the memory of sent outputs that nothing can read any more.

            The send holds its own reference to the storage until it completes, and
            autograd needs only an output's grad_fn, not its data.  An output's data goes
            when autograd produced it (it has a grad_fn: no input, parameter, buffer or
            tensor without gradient), it is not a view (its storage is its base's) and
            nothing else holds the tensor (use count 1; autograd holds a tensor that a
            later op saved for its backward, while an op saving its own output keeps a
            separate alias).  Everything else is sent and kept until its backward."""
            for t in out:
                if t.grad_fn is None:
                    continue
                if t._base is not None:
                    view_kept(c, m, t)
                elif t._use_count() == 1 and not any(t is x for x in inputs[c][m]):
                    t.data = torch.empty(0, dtype=t.dtype, device=t.device)

        def view_kept(c, m, t):
            if self._warned_view:
                return
            base = t._base
            if any(base is x or base is x._base for x in inputs[c][m] if x is not None):
                return  # a view of an input: kept anyway for its own backward
            self._warned_view = True
            warnings.warn(
                f"pipeline rank {rank}: a stage output sent to the next stage is a view of "
                f"another tensor ({t.dtype}{list(t.shape)} of {base.dtype}{list(base.shape)}); "
                "it is sent correctly, but its memory (its base's) stays allocated until the "
                "micro-batch's backward: return a fresh tensor (e.g. .clone()) to let the "
                "pipeline release it after sending", stacklevel=2)

        def backward_args(c, m, text):
            """(loss, outputs, output grads) to backpropagate micro-batch m of chunk c."""
            if is_last[c]:
                loss = losses[c][m]
                if loss is None:
                    raise PipelineError(f"pipeline rank {rank}, action {text}: no loss to "
                                        "backpropagate (criterion returned None?)", rank, text)
                return loss, (), ()
            outs = outputs[c][m]
            grads = out_grads[c][m]
            out_grads[c][m] = None
            # outputs that need a gradient, paired with theirs; None: none reached it
            pairs = [(o, g) for o, g in zip((o for o in outs if o.requires_grad), grads)
                     if g is not None]
            return None, tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)

        def after_backward(c, m, text, sends):
            nonlocal live
            live -= 1
            outputs[c][m] = None
            ins = inputs[c][m]
            inputs[c][m] = None
            if is_first[c]:
                return
            need = [t for t in ins if t.requires_grad]
            grads = [t.grad for t in need]  # None where no gradient reached an input
            pl = prev_local[c]
            if pl is not None:
                out_grads[pl][m] = grads
            for (k, sc, sm, peer, sid) in sends:
                if k == B and sc == c:
                    send(B, c, m, peer, sid, grads, text, need)

        whole_backward = self._whole_backward

        def run_b(c, m, defer, text):
            loss, outs, grads = backward_args(c, m, text)
            defer = defer and not whole_backward[c]
            WeightGradStore.enabled = defer
            try:
                if loss is not None:
                    loss.backward()
                    losses[c][m] = loss.detach()
                elif outs:
                    run_backward(outs, grads)
            finally:
                WeightGradStore.enabled = False
            if defer:
                wgrads[(c, m)] = WeightGradStore.take()

        text = "start of step"
        agreed = False
        poll = p2p.poll  # None when the transport needs no driving between actions
        try:
            for (kind, c, m, c2, m2, need, sends, post_upto, text) in plan.ops:
                if poll is not None:
                    poll()  # keep large messages streaming between compute actions
                if post_upto > posted:
                    post_until(post_upto)
                for idx in need:
                    rk, rc, rm, _ = recvs[idx]
                    tensors = wait_recv(idx, text)
                    for sid in release[idx]:  # sends now known to have arrived: free them
                        h = pending.pop(sid, None)
                        if h is not None:
                            h.wait(timeout)
                    if rk == F:
                        metas = meta_recv[meta_key(rc)]
                        for t, mt in zip(tensors, metas):
                            if mt.requires_grad and training:
                                t.requires_grad_(True)
                        inputs[rc][rm] = tuple(tensors)
                    else:
                        mask = mask_recv[meta_key(rc)]
                        out_grads[rc][rm] = tensors if mask is True else \
                            [g if keep else None for g, keep in zip(tensors, mask)]
                if device_clock:
                    e0 = take()
                    e0.record(stream)
                else:
                    t0 = clock()
                if kind == F:
                    out, _ = forward(c, m, text)
                    after_forward(c, m, out, text, sends)
                elif kind == FB and self.overlapped_forward_backward:
                    ins0 = inputs[c][m]
                    crit0 = criterion if is_last[c] else None
                    lab0 = label_mbs[c][m] if crit0 is not None else []
                    loss1, outs1, grads1 = backward_args(c2, m2, text)
                    out0, loss0 = type(modules[0]).overlapped_forward_backward(
                        modules[c], ins0, crit0, lab0, modules[c2], loss1, list(outs1),
                        list(grads1))
                    if loss1 is not None:
                        losses[c2][m2] = loss1.detach()
                    out0 = _as_tuple(out0)
                    if crit0 is not None:
                        losses[c][m] = loss0
                    after_forward(c, m, out0, text, sends)
                    after_backward(c2, m2, text, sends)
                elif kind == FB:
                    out, _ = forward(c, m, text)
                    after_forward(c, m, out, text, sends)
                    run_b(c2, m2, False, text)
                    after_backward(c2, m2, text, sends)
                elif kind == B or kind == I:
                    run_b(c, m, kind == I, text)
                    after_backward(c, m, text, sends)
                else:  # W
                    for fn in wgrads.pop((c, m), ()):
                        fn()
                if device_clock:
                    e1 = take()
                    e1.record(stream)
                    spans.append((e0, e1, text, "compute"))
                else:
                    t1 = clock()
                    busy += t1 - t0
                    if record:
                        times.append((t0 - t_start, t1 - t_start, text, "compute"))
            if self.confirm_steps:
                # every rank agrees the step succeeded before any returns, so a rank
                # failing in its last actions cannot leave the others stepping their
                # optimizers on a step it did not finish; after it, every receive has
                # been posted, so draining the sends below cannot block
                text = _AGREEMENT
                # (on NCCL the collective queues behind everything this step's kernels
                # waited for, so this host-side deadline also bounds every transfer)
                p2p.all_gather(torch.ones(1, dtype=torch.int64, device=self.device),
                               self.num_ranks, "end-of-step agreement").wait(
                    timeout, self._abort, host=True)
                agreed = True
                self._agreements += 1
                if self._board is not None:
                    self._board.agreed = self._agreements  # the heartbeat says it
            text = "end of step (sends)"
            for h in send_handles:
                h.wait(timeout)
            for h in pending.values():
                h.wait(timeout)
            pending.clear()
        except Exception as e:  # noqa: BLE001 - every failure stops all ranks, see _failed
            # drop every reference to the transfers and the backend held by this frame,
            # its closures and the traceback, so the teardown in _failed really closes
            # the connections (peers then stop at once instead of at their timeout)
            p2p = None  # noqa: F841 - a cell the nested functions share
            recv_handles.clear()
            meta_handles.clear()
            send_handles.clear()
            pending.clear()
            h = None  # noqa: F841
            # the step is complete on every rank once any rank completed the agreement
            # (every rank had contributed to it): then this rank returns too, and the
            # failure is raised by the next step, so no two ranks disagree on which
            # step failed (dualpipe.failures)
            committed = agreed
            if not agreed and text == _AGREEMENT and isinstance(e, PeerError) \
                    and self._board is not None:
                # close this rank's connections first: a rank still blocked in the
                # all_gather (waiting for data this rank will never forward) then fails
                # at once and votes, instead of holding the vote to its deadline
                traceback.clear_frames(e.__traceback__)  # its frames hold the transfers
                self._release(failed=True)
                committed = self._board.agreement_committed(self._agreements + 1)
            err = self._failed(e, text, e.__traceback__)
            if not committed:
                raise err from e
            log.warning("pipeline rank %d: step %d completed on every rank; the failure "
                        "after it is raised by the next step: %s", rank, self.steps_done + 1, err)
            if not agreed:
                self._agreements += 1
            self._stopped_error = err
        # results
        loss_out, outs_out = None, None
        for c in range(nchunk):
            if is_last[c]:
                if criterion is not None:
                    loss_out = torch.stack([x.detach() for x in losses[c]])
                if return_outputs:
                    o = gather(kept_outputs[c], self.batch_dim)
                    outs_out = o[0] if len(o) == 1 else tuple(o)
        self.steps_done += 1
        if device_clock:
            end = take()
            end.record(stream)
            self._pending = _DeviceStep(self._ev_start, end, spans, record, peak,
                                        len(plan.ops))
        else:
            self._last_stats = StepStats(wall=clock() - t_start, busy=busy, wait=wait_total,
                                         peak_activations=peak, num_compute=len(plan.ops))
            if record:
                self._times = [(a, b, _parse_cached(t), lane) for (a, b, t, lane) in times]
        return loss_out, outs_out

    def _exchange(self, what: str, fn):
        """Run ``fn(p2p)`` (transfers outside ``step``, e.g. gradient reduction) with the
        pipeline's failure handling: any failure stops every rank as in ``step``."""
        if self._stopped is not None:
            raise RuntimeError(self._stopped)
        try:
            return fn(self._p2p)
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, what, e.__traceback__) from e

    # ------------------------------------------------------------------ failures
    def _failure_record(self) -> str | None:
        """The failure another rank recorded for this pipeline, if any (one board read)."""
        rec = self._board.read() if self._board is not None else None
        return None if rec is None else rec.text

    @property
    def _abort(self):
        """The abort callback of host-side waits: the store-backed record (gloo, NCCL).
        Shared memory needs none: a failing rank's stop flag ends every wait itself."""
        return self._failure_record if isinstance(self._board, StoreBoard) else None

    def _failed(self, e: BaseException, action: str, tb=None) -> PipelineError:
        """Turn ``e`` (raised at ``action`` on this rank) into the error every rank raises.

        A failure of this rank's own (an exception in a stage, a check of the runtime)
        is recorded as it is.  A failed transfer (:class:`overlap.p2p.PeerError`) is
        first looked up: when another rank recorded a failure, this rank raises that
        one, adding where it stopped.  Otherwise this rank finds the culprit: a rank
        whose process died or stopped answering (dualpipe.failures), else the peer of
        the transfer.  The first record written is the one every rank raises; then
        the transports are dropped, which ends every other rank's pending transfer at
        once.  The user's process group stays usable; this pipeline object does not:
        build a new one to go on."""
        if isinstance(e, PipelineError) and getattr(e, "_reported", False):
            return e  # made here already (recorded, or read from another rank's record)
        if tb is not None:  # finished frames below the caller may hold transfers
            traceback.clear_frames(tb)
        rank, board = self.rank, self._board
        where = f"pipeline rank {rank}, action {action}"
        rec, mine = None, True
        if isinstance(e, PeerError):
            rec = board.read() if board is not None else None
            mine = rec is None
            if mine:
                rec, mine = self._diagnose(e, where)
        else:
            # also the runtime's own checks in the loop (a PipelineError that says what
            # went wrong): recorded like any failure, so the other ranks stop too
            text = str(e)
            if text.startswith(where + ": "):  # said where already: do not say it twice
                text = text[len(where) + 2:]
            what = "" if isinstance(e, PipelineError) else f"{type(e).__name__}: "
            rec = Record(rank, "error", f"{where}: {what}{text}")
        if mine and board is not None and not board.write(rec):
            other = board.read()  # another rank recorded first: every rank raises that one
            if other is not None:
                rec, mine = other, False
        msg = rec.text if mine else f"{rec.text} (pipeline rank {rank} stopped at action {action})"
        if not mine and board is not None:
            board.ack()
        cls = PipelineTimeout if rec.kind == "timeout" else PipelineError
        err = cls(msg, rank, action, rec.culprit)
        err._reported = True
        log.error("%s", err)
        self._release(failed=True)
        self._stopped = ("this pipeline stopped after a failure (see the earlier "
                         "PipelineError); build a new DualPipe/DualPipeV to go on")
        if board is not None:
            board.wait_for_readers_at_exit()  # a no-op unless this process hosts the store
        return err

    def _diagnose(self, e: PeerError, where: str) -> tuple[Record, bool]:
        """The record for a failed transfer nobody has recorded: ``(record, mine)``, where
        ``mine`` is False when another rank's record turned up meanwhile."""
        board = self._board
        g = getattr(e, "peer", -1)
        peer = self._to_pipe[g] if 0 <= g < self.num_ranks else None
        if board is None:
            kind = "timeout" if isinstance(e, PeerTimeout) else "lost"
            return Record(peer, kind, f"{where}: {e}"), True
        try:
            silent = set(board.silent_in_vote) or board.not_responding()
        except StoreUnresponsive:
            silent = None
        if silent is None or board.unresponsive:  # the store's host itself is silent
            h = board.host
            who = f"pipeline rank {h}" if h is not None else "global rank 0 (not in this pipeline)"
            if board.gone:
                return Record(h, "lost", f"{where}: {e}; the process group's store, hosted by "
                              f"{who}, is gone: that process died"), True
            return Record(h, "timeout", f"{where}: {e}; the process group's store, hosted by "
                          f"{who}, does not answer either: that process is stopped or "
                          "hung"), True
        if silent:
            v = peer if peer in silent else min(silent)
            state = board.state(v)
            if state == "exited" or (state is None and not isinstance(e, PeerTimeout)):
                return Record(v, "lost", f"{where}: rank {v} died (its process exited or was "
                              f"killed; {e})"), True
            return Record(v, "timeout", f"{where}: {e}; rank {v} is not responding (its "
                          "process is stopped or hung)"), True
        if isinstance(e, PeerTimeout):
            return Record(peer, "timeout", f"{where}: {e}"), True
        if not isinstance(e, PeerExited):
            # the peer is alive and closed the connection: it is stopping the pipeline,
            # and its record is on the way
            end = time.monotonic() + RECORD_DEADLINE
            while time.monotonic() < end:
                rec = board.read()
                if rec is not None:
                    return rec, False
                time.sleep(0.02)
        return Record(peer, "lost", f"{where}: {e}; another rank crashed, was killed or lost "
                      "its connection"), True

    def _own_nccl_groups(self, groups: tuple) -> None:
        """Keep ``groups`` (private NCCL communicators) as the transport's backends and
        shut them down when this pipeline is garbage-collected without :meth:`close`
        (:meth:`_release` does it earlier, aborting them after a failure)."""
        self._pg = groups
        self._groups_finalizer = weakref.finalize(self, _release_groups, groups, False)

    def _release(self, failed: bool) -> None:
        """Release the transports: after a failure every peer's pending transfer must end
        at once (shm stop flag, gloo connections closed, NCCL communicators aborted);
        otherwise they are closed in order (NCCL: ``shutdown()``)."""
        p2p, self._p2p = self._p2p, None
        if p2p is not None:
            p2p.close(failed=failed)  # shm: with failed=True every peer's wait ends at once
        del p2p
        pgs, self._pg = self._pg, None
        fin, self._groups_finalizer = self._groups_finalizer, None
        if fin is not None and fin.detach() is not None:  # NCCL (never gloo: see below)
            _release_groups(pgs, failed)
        del pgs
        if not failed and self._board is not None:
            # (after a failure the heartbeat goes on while this object lives: a rank
            # diagnosing a failure must not take this one for a silent one)
            self._board.close()
        self.group = None
        gc.collect()  # gloo closes the connections when the last reference goes


    @staticmethod
    def _check_declared(metas: list[TensorMeta]) -> None:
        """What a stage sends against set_p2p_tensor_shapes/dtype (the caller's failure
        path names the rank and the action)."""
        if _p2p_shapes is not None and [m.shape for m in metas] != _p2p_shapes:
            raise ValueError(f"the stage sends shapes {[list(m.shape) for m in metas]} but "
                             f"set_p2p_tensor_shapes declared {[list(s) for s in _p2p_shapes]}")
        if _p2p_dtype is not None and any(m.dtype != _p2p_dtype for m in metas
                                          if m.dtype.is_floating_point):
            raise ValueError(f"the stage sends dtypes {[str(m.dtype) for m in metas]} but "
                             f"set_p2p_tensor_dtype declared {_p2p_dtype}")


_clone_count: dict[str, int] = {}


def _is_fsdp(module: nn.Module) -> bool:
    """Whether ``module`` or a submodule is FSDP2-sharded (``fully_shard``)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch < 2.6 keeps it private
        try:
            from torch.distributed._composable.fsdp import FSDPModule
        except ImportError:
            return False
    return any(isinstance(m, FSDPModule) for m in module.modules())


@dataclass
class _DeviceStep:
    """A finished step's CUDA events, read when its figures are first asked for."""

    start: Any          # event recorded when step() began (the clock's origin)
    end: Any            # event recorded after the last send was waited for
    spans: list         # (begin event, end event, action text, lane) in recording order
    record: bool        # keep the intervals (record_timeline)
    peak: int
    num_compute: int


def _on_device_clock(start, end, spans) -> tuple[list[tuple], float, float, float]:
    """Place a step's intervals on the device clock.

    ``start``/``end``: events recorded on the current stream when the step began and
    after it ended; ``spans``: ``(begin, end, text, lane)`` event pairs recorded on the
    same stream.  Waits for ``end`` (so for every event before it).  Returns the
    intervals as ``(a, b, text, lane)`` in seconds from ``start``, and ``wall`` (start
    to end), ``busy`` (sum of the ``compute`` intervals) and ``wait`` (sum of the
    ``wait`` intervals), in seconds, all from the same events.
    """
    end.synchronize()
    out, busy, wait = [], 0.0, 0.0
    for e0, e1, text, lane in spans:
        a, b = start.elapsed_time(e0) / 1e3, start.elapsed_time(e1) / 1e3
        out.append((a, b, text, lane))
        if lane == "compute":
            busy += b - a
        else:
            wait += b - a
    return out, start.elapsed_time(end) / 1e3, busy, wait


def _nccl_groups(store, prefix: str, rank: int, size: int, timeout: datetime.timedelta,
                 max_ctas: int | None) -> tuple:
    """The pipeline's two private NCCL communicators, ``(up, down)`` (see
    :class:`overlap.p2p.P2P`), with high-priority internal streams, ``timeout`` as their
    watchdog timeout and, when ``max_ctas`` is given, NCCL's CTA cap (``config.max_ctas``,
    see :func:`overlap.partition.nccl_process_group_options`; otherwise NCCL's default
    or ``$NCCL_MAX_CTAS``).  If the second cannot be made, the first is aborted."""
    from overlap.partition import nccl_process_group_options
    made: list = []
    try:
        for direction in ("up", "down"):
            opts = nccl_process_group_options(max_ctas=max_ctas, high_priority_stream=True)
            opts._timeout = timeout
            made.append(dist.ProcessGroupNCCL(dist.PrefixStore(f"{prefix}/{direction}", store),
                                              rank, size, opts))
    except BaseException:
        _release_groups(made, failed=True)
        raise
    return tuple(made)


def _release_groups(groups, failed: bool) -> None:
    """Shut down private NCCL communicators (never raises: it also runs from a
    finalizer).  After a failure ``abort()`` (pending transfers may never finish),
    otherwise ``shutdown()``; each falls back to the other names torch has used
    (``_shutdown`` before ``shutdown`` became public)."""
    names = ("abort", "shutdown", "_shutdown") if failed else ("shutdown", "_shutdown", "abort")
    for pg in groups:
        fn = next((getattr(pg, n) for n in names if callable(getattr(pg, n, None))), None)
        if fn is None:
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the communicator may be gone already
            log.debug("releasing the pipeline's NCCL communicator failed: %s", exc)


def _setup_error(e: Exception, rank: int, world: int, timeout: float) -> PipelineError:
    """The error a rank raises when setting up the pipeline's transports fails: another
    rank did not arrive in time (:class:`PipelineTimeout`), failed or exited meanwhile
    (:class:`PipelineError`).  Whatever raised it (the shared-memory agreement's
    ``PeerError``, the store's or a process group's own error), it says what to check."""
    if isinstance(e, PeerError):
        what, timed_out = str(e), isinstance(e, PeerTimeout)
    else:
        lines = str(e).strip().splitlines()
        first = lines[0][:200] if lines else ""
        what = f"setting up the pipeline's communicators: {type(e).__name__}: {first}"
        timed_out = "imeout" in first or "imed out" in first
    msg = f"pipeline rank {rank}, building the pipeline: {what}; "
    if timed_out:
        msg += (f"building a pipeline is collective (timeout={timeout:g} s): check that every "
                f"rank of the process group ({world} ranks) builds this pipeline, that every "
                "rank builds its pipelines in the same order, and that no rank failed or "
                "is stuck before it")
        return PipelineTimeout(msg, rank, "building the pipeline")
    msg += ("another rank failed, exited or lost its connection while the pipeline was "
            "being built: see the error on the other ranks, and check that every rank builds "
            "its pipelines in the same order")
    return PipelineError(msg, rank, "building the pipeline")


def _group_store(group):
    try:
        return dist.distributed_c10d._get_process_group_store(group)
    except Exception:  # noqa: BLE001 - older torch: the default store
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: failures are reported locally only
            return None


def _store_host(group, rank_mapping) -> int | None:
    """The pipeline rank whose process hosts the process group's store: global rank 0
    (the TCPStore server under env:// and torchrun), if it is in ``group``."""
    try:
        return rank_mapping[dist.get_group_rank(group, 0)]
    except Exception:  # noqa: BLE001 - global rank 0 is not in this group
        return None


_parse_memo: dict[str, Action] = {}


def _parse_cached(text: str) -> Action:
    a = _parse_memo.get(text)
    if a is None:
        from ..schedules import parse_action
        a = _parse_memo[text] = parse_action(text)
    return a


split_linear_weight_grads_fn = split_linear_weight_grads
