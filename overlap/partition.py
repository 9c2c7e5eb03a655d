"""Split a GPU's SMs between computation and communication.

:class:`SMPartition` gives a *compute* stream and a *communication* stream whose kernels
run on separate SM sets, plus the SM budgets to size kernels with: ``comm_sms`` for
communication kernels and ``compute_sms`` for the persistent Triton kernels
(``overlap.kernels``), whose grid is ``min(compute_sms, tiles)``.

What a partition confines: kernels launched on its streams.  NCCL launches the kernels
of asynchronous operations (``async_op=True``, ``isend``/``irecv``, the DualPipe
runtime's transfers) on ProcessGroupNCCL's internal stream, outside any green context:
they are *not* confined to the communication SMs.  For them the partition gives a CTA
cap (:attr:`SMPartition.nccl_max_ctas`, :meth:`SMPartition.nccl_options`), which bounds
how many SMs they occupy at once, not which.  Synchronous collectives issued under
``with part.comm():`` run on the comm stream from torch 2.8 on.  See
docs/sm_partition.md, "NCCL's SM use: what is confined".

Backends, tried in this order by ``backend="auto"`` (the first that works wins):

``"green_ctx"``
    Our extension (``csrc/cuda/green_ctx.cu``) splits the device's SM resource once into
    a communication group and the remainder and makes one green context and one stream
    on each: both sides are hardware-enforced and disjoint; the SM counts are read back
    from the driver. Needs the CUDA build of the extension and a CUDA >= 12.5 driver.
``"torch_green_ctx"``
    ``torch.cuda.green_contexts.GreenContext`` (torch >= 2.12 for ``Stream()``): torch
    carves one context of ``comm_sms`` SMs; the compute stream is an ordinary stream, so
    only the communication side is hardware-confined (``disjoint=False``); compute is
    kept off the comm SMs only in software (kernels sized with ``compute_sms``). torch
    creates the context from the whole device each time, so two torch contexts would
    overlap -- which is why our extension's split is preferred when present.
``"priority"``
    Two plain streams, communication at the highest priority. SMs are NOT partitioned;
    ``compute_sms`` is only a software budget. A warning says so.
``"cpu"``
    The CPU twin: no-op streams (``overlap.streams.HostStream``), the same rounding and budgets computed for a modelled
    GPU (default: 132 SMs, Hopper granularity), so callers are device-agnostic.

Rounding (green contexts hand out SMs in groups): the request is rounded to the device's
granularity -- minimum partition size and alignment; on Hopper both are 8 -- with
``rounding="up"`` (default: the communication side gets at least what it asked for),
``"down"`` (at most what it asked for, never below the minimum) or ``"exact"`` (raise
unless the request already fits). The compute side must keep at least one minimum
partition. The counts actually granted are read back where the backend allows
(``readback=True``) and always reported; see docs/sm_partition.md.

Nothing here touches CUDA at import time; a partition probes the device when created.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import weakref
from typing import Dict, Optional, Tuple

import torch

from overlap.streams import HostStream

log = logging.getLogger(__name__)

__all__ = [
    "SMPartition",
    "SMGranularity",
    "PartitionError",
    "PartitionConfigError",
    "PartitionUnavailableError",
    "PartitionClosedError",
    "round_comm_sms",
    "documented_granularity",
    "NCCL_MAX_CTAS_LIMIT",
    "nccl_cta_env",
    "apply_nccl_cta_env",
    "nccl_process_group_options",
    "nccl_max_ctas_of",
    "GREEN_CTX_EXTRA_SMS",
    "ProbeCheck",
    "check_probe",
]

BACKENDS = ("auto", "green_ctx", "torch_green_ctx", "priority", "cpu")
ROUNDINGS = ("up", "down", "exact")
#: NCCL caps CTAs (channels) per communicator at 64 (NCCL_MAX_CTAS / ncclConfig_t.maxCTAs).
NCCL_MAX_CTAS_LIMIT = 64
#: What the CPU twin models unless told otherwise: an H800/H200-sized Hopper.
CPU_MODEL_SMS = 132
#: SMs green-context work may use beyond its partition: on compute capability 9.x, once
#: a module with dynamic parallelism (CDP) is loaded, kernels under green contexts "may
#: use and share an additional set of 2 SMs" (CUDA driver API, Green Contexts). The
#: probe checks allow them (each side up to its count + 2, the sides sharing up to 2).
GREEN_CTX_EXTRA_SMS = 2


class PartitionError(RuntimeError):
    """Base class of SM-partition errors."""


class PartitionConfigError(PartitionError, ValueError):
    """The request cannot be satisfied as given (the message says what to change)."""


class PartitionUnavailableError(PartitionError):
    """The requested backend cannot run here (no extension, old torch/driver, no GPU)."""


class PartitionClosedError(PartitionError):
    """The partition was closed; its streams must not be used any more."""


@dataclasses.dataclass(frozen=True)
class SMGranularity:
    """How a device's SMs can be split: partitions hold at least ``min_partition`` SMs,
    in multiples of ``alignment`` SMs."""

    min_partition: int
    alignment: int


def documented_granularity(major: int) -> SMGranularity:
    """Green-context granularity by compute-capability major, as the CUDA 12 driver docs
    give it (CUDA 13 drivers report it; :class:`SMPartition` prefers their answer)."""
    if major >= 9:
        return SMGranularity(8, 8)
    if major == 8:
        return SMGranularity(4, 2)
    if major == 7:
        return SMGranularity(2, 2)
    return SMGranularity(1, 1)


def round_comm_sms(requested: int, total_sms: int, granularity: SMGranularity,
                   rounding: str = "up") -> int:
    """Round a communication SM request to what the hardware can partition.

    Args:
        requested: SMs asked for the communication side (>= 1).
        total_sms: SMs of the device.
        granularity: minimum partition size and alignment (see :class:`SMGranularity`).
        rounding: ``"up"`` to the next multiple of the alignment (and at least the
            minimum), ``"down"`` to the previous one (but at least the minimum),
            ``"exact"`` to raise unless ``requested`` is already valid.
    Returns:
        The communication SM count to request; the compute side gets the rest.
    Raises:
        PartitionConfigError: bad arguments, or nothing useful would be left for compute.
    """
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise PartitionConfigError(f"comm_sms must be a positive int, got {requested!r}")
    if rounding not in ROUNDINGS:
        raise PartitionConfigError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    step, low = granularity.alignment, granularity.min_partition
    if rounding == "exact":
        if requested < low or requested % step:
            raise PartitionConfigError(
                f"comm_sms={requested} is not a valid partition size on this device (at least "
                f"{low}, a multiple of {step}); pass e.g. {max(low, requested - requested % step)} "
                f"or {max(low, -(-requested // step) * step)}, or rounding='up'/'down'")
        sms = requested
    elif rounding == "up":
        sms = max(low, -(-requested // step) * step)
    else:
        sms = max(low, requested // step * step)
    if total_sms - sms < low:
        raise PartitionConfigError(
            f"comm_sms={requested} (rounded {rounding} to {sms}) leaves {total_sms - sms} of "
            f"{total_sms} SMs for compute, fewer than the minimum partition of {low}; "
            f"lower comm_sms to at most {(total_sms - low) // step * step}")
    return sms


@dataclasses.dataclass(frozen=True)
class ProbeCheck:
    """What the SM-id probe saw on each side of a partition, and whether that fits.

    ``comm`` / ``compute``: SM ids (``%smid``) reached by kernels on each stream;
    ``sm_id_limit``: ``%nsmid``, the bound of valid ids (ids need not be contiguous, so
    it may exceed the SM count); ``extra_sms``: the extra, shared SMs green-context work
    may use (:data:`GREEN_CTX_EXTRA_SMS`); ``problems``: one line per violation (empty:
    the partition holds).
    """

    comm: frozenset
    compute: frozenset
    sm_id_limit: int
    comm_sms: int
    compute_sms: int
    enforced: str
    extra_sms: int
    problems: Tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def shared(self) -> frozenset:
        """SM ids both sides reached."""
        return self.comm & self.compute

    def describe(self) -> Dict[str, object]:
        """Plain data for logs and result files."""
        return {"comm": sorted(self.comm), "compute": sorted(self.compute),
                "shared": sorted(self.shared), "sm_id_limit": self.sm_id_limit,
                "comm_sms": self.comm_sms, "compute_sms": self.compute_sms,
                "enforced": self.enforced, "extra_sms": self.extra_sms,
                "ok": self.ok, "problems": list(self.problems)}


def check_probe(seen: Dict[str, set], *, comm_sms: int, compute_sms: int, sm_id_limit: int,
                enforced: str, extra_sms: int = GREEN_CTX_EXTRA_SMS) -> ProbeCheck:
    """Check SM-id probe results (:meth:`SMPartition.probe`) against a partition.

    Every id must lie in ``[0, sm_id_limit)`` (``%nsmid``; ids are not assumed to be
    contiguous nor below the SM count) and each side must have reached some SM. A
    hardware-confined side (``enforced`` ``"comm"`` or ``"both"``) may reach at most its
    SM count plus ``extra_sms``; with ``"both"`` the two sides may share at most
    ``extra_sms`` SMs: CUDA lets green-context work use an additional, shared set of 2
    SMs once a module with dynamic parallelism is loaded (:data:`GREEN_CTX_EXTRA_SMS`),
    which a probe cannot tell apart from a leak of at most that size.
    """
    comm, compute = frozenset(seen.get("comm", ())), frozenset(seen.get("compute", ()))
    problems = []
    note = (f" (green-context work may use {extra_sms} extra, shared SMs once a module "
            "with dynamic parallelism is loaded; more than that is a leak)")
    for side, ids in (("comm", comm), ("compute", compute)):
        if not ids:
            problems.append(f"{side}: the probe reached no SM")
        bad = sorted(i for i in ids if not 0 <= i < sm_id_limit)
        if bad:
            problems.append(f"{side}: SM ids {bad} outside [0, %nsmid={sm_id_limit})")
    if enforced in ("comm", "both") and len(comm) > comm_sms + extra_sms:
        problems.append(f"comm: reached {len(comm)} SMs, more than its {comm_sms} + "
                        f"{extra_sms}{note}")
    if enforced == "both":
        if len(compute) > compute_sms + extra_sms:
            problems.append(f"compute: reached {len(compute)} SMs, more than its "
                            f"{compute_sms} + {extra_sms}{note}")
        shared = sorted(comm & compute)
        if len(shared) > extra_sms:
            problems.append(f"the two sides share {len(shared)} SMs {shared}, more than "
                            f"{extra_sms}{note}")
    return ProbeCheck(comm, compute, int(sm_id_limit), comm_sms, compute_sms, enforced,
                      extra_sms, tuple(problems))


def _resolve_device(device) -> torch.device:
    """:func:`overlap.streams.resolve_device`, with the partition's error types."""
    from .streams import resolve_device
    try:
        return resolve_device(device)
    except ValueError as e:
        raise PartitionConfigError(f"SMPartition supports cuda and cpu devices: {e}") from e
    except RuntimeError as e:
        raise PartitionUnavailableError(f"SMPartition: {e}") from e


def _release_green_ctx(handle: int) -> None:
    """Finalizer of the extension backend; safe to call at interpreter exit."""
    try:
        torch.ops.dualpipe_ext.green_ctx_destroy(handle)
    except Exception as exc:  # the CUDA context may already be gone at exit
        log.debug("green context release failed: %s", exc)


class SMPartition:
    """A compute stream and a communication stream on (ideally) disjoint SM sets.

    Args:
        comm_sms: SMs for communication kernels (DeepSeek-V3 used 20 of 132 on H800;
            DeepEP V2 reports 4-6 sufficing). Rounded to the device granularity (see
            ``rounding``); the rest of the device is the compute side.
        device: ``torch.device``, ``"cuda:1"``, an int (CUDA ordinal) or ``"cpu"``;
            ``None`` = the current CUDA device if CUDA is available, else CPU.
        backend: ``"auto"`` or one of ``"green_ctx"``, ``"torch_green_ctx"``,
            ``"priority"``, ``"cpu"`` (see the module docstring). Asking for one that
            cannot run raises :class:`PartitionUnavailableError`.
        rounding: ``"up"`` (default), ``"down"`` or ``"exact"``; see :func:`round_comm_sms`.
        total_sms: CPU twin only: SM count of the modelled GPU (default 132).
        granularity: CPU twin only: modelled granularity (default Hopper's 8/8).

    Attributes (read-only):
        device, backend, requested_comm_sms, comm_sms, compute_sms, total_sms,
        granularity, disjoint (both sides hardware-confined and non-overlapping),
        enforced (``"both"``, ``"comm"`` or ``"none"``: which side the hardware
        confines), readback (SM counts were read back from the driver),
        comm_stream, compute_stream.

    Use as a context manager or call :meth:`close` to release green contexts::

        with SMPartition(comm_sms=20) as part:
            with part.comm():          # kernels launched here run on the comm SMs
                ...                    # (async NCCL does not: cap it, nccl_options())
            with part.compute():       # GEMMs sized with part.compute_sms
                ...
    """

    def __init__(self, comm_sms: int, device=None, *, backend: str = "auto",
                 rounding: str = "up", total_sms: Optional[int] = None,
                 granularity: Optional[SMGranularity] = None) -> None:
        if backend not in BACKENDS:
            raise PartitionConfigError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if rounding not in ROUNDINGS:
            raise PartitionConfigError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if isinstance(comm_sms, bool) or not isinstance(comm_sms, int) or comm_sms < 1:
            raise PartitionConfigError(f"comm_sms must be a positive int, got {comm_sms!r}")
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer = None
        self._handle = None  # keeps the torch GreenContext alive for that backend
        self.requested_comm_sms = comm_sms
        self.rounding = rounding
        self.device = _resolve_device(device)
        if self.device.type == "cpu":
            if backend not in ("auto", "cpu"):
                raise PartitionUnavailableError(f"backend {backend!r} needs a CUDA device, got cpu")
            self._init_cpu(total_sms, granularity)
            return
        if backend == "cpu":
            raise PartitionConfigError("backend='cpu' needs device='cpu'")
        if total_sms is not None or granularity is not None:
            raise PartitionConfigError("total_sms/granularity model a GPU for the CPU twin only; "
                                       "on CUDA they are read from the device")
        self._init_cuda(backend)

    # ---- construction --------------------------------------------------------------

    def _set(self, *, backend: str, comm_sms: int, compute_sms: int, total_sms: int,
             granularity: SMGranularity, enforced: str, readback: bool, comm_stream,
             compute_stream) -> None:
        self.backend = backend
        self.comm_sms = comm_sms
        self.compute_sms = compute_sms
        self.total_sms = total_sms
        self.granularity = granularity
        self.enforced = enforced
        self.disjoint = enforced == "both"
        self.readback = readback
        self._comm_stream = comm_stream
        self._compute_stream = compute_stream
        if comm_sms != self.requested_comm_sms:
            log.info("SMPartition(%s): comm_sms %d rounded %s to %d (granularity %d/%d)",
                     backend, self.requested_comm_sms, self.rounding, comm_sms,
                     granularity.min_partition, granularity.alignment)

    def _init_cpu(self, total_sms: Optional[int], granularity: Optional[SMGranularity]) -> None:
        total = CPU_MODEL_SMS if total_sms is None else total_sms
        if isinstance(total, bool) or not isinstance(total, int) or total < 2:
            raise PartitionConfigError(f"total_sms must be an int >= 2, got {total_sms!r}")
        gran = granularity if granularity is not None else documented_granularity(9)
        comm = round_comm_sms(self.requested_comm_sms, total, gran, self.rounding)
        self._set(backend="cpu", comm_sms=comm, compute_sms=total - comm, total_sms=total,
                  granularity=gran, enforced="none", readback=False,
                  comm_stream=HostStream("comm"), compute_stream=HostStream("compute"))

    def _init_cuda(self, backend: str) -> None:
        order = ("green_ctx", "torch_green_ctx", "priority") if backend == "auto" else (backend,)
        reasons = []
        for name in order:
            try:
                getattr(self, f"_init_{name}")()
                break
            except PartitionConfigError:
                raise  # the request itself is wrong: another backend will not fix it
            except PartitionUnavailableError as exc:
                if backend != "auto":
                    raise
                reasons.append(f"{name}: {exc}")
                log.debug("SMPartition backend %s unavailable: %s", name, exc)
        else:
            raise PartitionUnavailableError(f"no SM-partition backend works on {self.device}: "
                                            + "; ".join(reasons))
        if self.backend == "priority":
            log.warning("SMPartition on %s: SMs are NOT partitioned (priority streams only; "
                        "compute_sms=%d is a software budget). %s", self.device, self.compute_sms,
                        "; ".join(reasons) if reasons else "backend='priority' requested")

    def _device_granularity(self) -> Tuple[int, SMGranularity, bool]:
        from overlap import _ext

        props = torch.cuda.get_device_properties(self.device)
        if _ext.extension_kind() == "cuda":
            try:
                total, low, step = torch.ops.dualpipe_ext.green_ctx_query(self.device.index)
                return int(total), SMGranularity(int(low), int(step)), True
            except RuntimeError as exc:
                log.debug("green_ctx_query failed, using documented granularity: %s", exc)
        return props.multi_processor_count, documented_granularity(props.major), False

    def _priorities(self) -> Tuple[int, int]:
        """(comm, compute) priorities: comm the greatest (numerically lowest) the device has."""
        least, greatest = torch.cuda.Stream.priority_range()
        return int(greatest), int(least)

    def _init_green_ctx(self) -> None:
        from overlap import _ext

        if _ext.extension_kind() != "cuda":
            raise PartitionUnavailableError(
                "needs the CUDA build of the dualpipe extension "
                f"(have: {_ext.extension_kind()}; {_ext.extension_error() or 'CPU-only build'})")
        total, gran, _ = self._device_granularity()
        comm = round_comm_sms(self.requested_comm_sms, total, gran, self.rounding)
        comm_priority, compute_priority = self._priorities()
        try:
            handle, comm_ptr, compute_ptr, comm_got, compute_got = \
                torch.ops.dualpipe_ext.green_ctx_create(self.device.index, comm, comm_priority,
                                                        compute_priority)
        except RuntimeError as exc:
            raise PartitionUnavailableError(f"green context creation failed: {exc}") from exc
        self._finalizer = weakref.finalize(self, _release_green_ctx, int(handle))
        comm_stream = torch.cuda.ExternalStream(int(comm_ptr), device=self.device)
        compute_stream = torch.cuda.ExternalStream(int(compute_ptr), device=self.device)
        if comm_got < self.requested_comm_sms and self.rounding != "down":
            log.warning("SMPartition: asked %d comm SMs, the driver granted %d",
                        self.requested_comm_sms, comm_got)
        self._set(backend="green_ctx", comm_sms=int(comm_got), compute_sms=int(compute_got),
                  total_sms=total, granularity=gran, enforced="both", readback=True,
                  comm_stream=comm_stream, compute_stream=compute_stream)

    def _init_torch_green_ctx(self) -> None:
        gc_mod = getattr(torch.cuda, "green_contexts", None)
        cls = getattr(gc_mod, "GreenContext", None)
        if cls is None or not getattr(gc_mod, "SUPPORTED", True):
            raise PartitionUnavailableError(f"torch {torch.__version__} has no usable "
                                            "torch.cuda.green_contexts (needs >= 2.10 built with CUDA >= 12.8)")
        if not hasattr(cls, "Stream"):
            raise PartitionUnavailableError(f"torch {torch.__version__} GreenContext has no Stream() "
                                            "(added in 2.12)")
        total, gran, readback = self._device_granularity()
        comm = round_comm_sms(self.requested_comm_sms, total, gran, self.rounding)
        try:
            ctx = cls.create(num_sms=comm, device_id=self.device.index)
            comm_stream = ctx.Stream()
        except (RuntimeError, TypeError) as exc:
            raise PartitionUnavailableError(f"torch green context creation failed: {exc}") from exc
        _, compute_priority = self._priorities()
        compute_stream = torch.cuda.Stream(device=self.device, priority=compute_priority)
        self._handle = ctx
        # torch gives no read-back of the granted SM count; `comm` is what was requested
        # after rounding (readback tells whether the granularity came from the driver).
        self._set(backend="torch_green_ctx", comm_sms=comm, compute_sms=total - comm,
                  total_sms=total, granularity=gran, enforced="comm", readback=False,
                  comm_stream=comm_stream, compute_stream=compute_stream)

    def _init_priority(self) -> None:
        props = torch.cuda.get_device_properties(self.device)
        total = props.multi_processor_count
        comm = self.requested_comm_sms
        if comm >= total:
            raise PartitionConfigError(f"comm_sms={comm} leaves no SM for compute on {self.device} "
                                       f"({total} SMs); lower it below {total}")
        comm_priority, compute_priority = self._priorities()
        self._set(backend="priority", comm_sms=comm, compute_sms=total - comm, total_sms=total,
                  granularity=SMGranularity(1, 1), enforced="none", readback=False,
                  comm_stream=torch.cuda.Stream(device=self.device, priority=comm_priority),
                  compute_stream=torch.cuda.Stream(device=self.device, priority=compute_priority))

    # ---- use -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise PartitionClosedError("this SMPartition was closed; create a new one")

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def comm_stream(self):
        """Stream for communication kernels (highest priority where the backend allows)."""
        self._check_open()
        return self._comm_stream

    @property
    def compute_stream(self):
        """Stream for compute kernels (size persistent kernels with :attr:`compute_sms`)."""
        self._check_open()
        return self._compute_stream

    def _stream_context(self, stream):
        if self.device.type == "cpu":
            return contextlib.nullcontext(stream)
        return torch.cuda.stream(stream)

    def comm(self):
        """Context manager making the communication stream current (no-op on CPU)."""
        return self._stream_context(self.comm_stream)

    def compute(self):
        """Context manager making the compute stream current (no-op on CPU)."""
        return self._stream_context(self.compute_stream)

    def stream_pair(self):
        """These two streams as an :class:`overlap.streams.StreamPair`, so ``overlap.fb``
        and the DualPipe runtime issue their compute/comm work on the partition."""
        from overlap.streams import StreamPair

        comm, compute = self.comm_stream, self.compute_stream
        return StreamPair(self.device, comm, compute, getattr(comm, "priority", 0),
                          getattr(compute, "priority", 0))

    @property
    def nccl_max_ctas(self) -> int:
        """NCCL's CTA cap for this partition: ``min(comm_sms, 64)`` (one CTA per channel
        occupies about one SM; NCCL allows at most 64)."""
        return min(self.comm_sms, NCCL_MAX_CTAS_LIMIT)

    def nccl_options(self, *, min_ctas: Optional[int] = None, high_priority_stream: bool = True):
        """``ProcessGroupNCCL.Options`` capping NCCL at :attr:`nccl_max_ctas` CTAs.

        Pass the result as ``pg_options`` to ``torch.distributed.new_group`` /
        ``init_process_group`` for the communication group; the DualPipe runtime takes
        the partition itself (``DualPipe(..., nccl_max_ctas=part)``) for its private
        communicators. See :func:`nccl_process_group_options` for what the cap does and
        does not confine.
        """
        return nccl_process_group_options(max_ctas=self.nccl_max_ctas, min_ctas=min_ctas,
                                          high_priority_stream=high_priority_stream)

    def describe(self) -> Dict[str, object]:
        """Everything known about the partition, for logs and benchmark records."""
        return {
            "device": str(self.device),
            "backend": self.backend,
            "requested_comm_sms": self.requested_comm_sms,
            "comm_sms": self.comm_sms,
            "compute_sms": self.compute_sms,
            "total_sms": self.total_sms,
            "min_partition": self.granularity.min_partition,
            "alignment": self.granularity.alignment,
            "rounding": self.rounding,
            "enforced": self.enforced,
            "disjoint": self.disjoint,
            "readback": self.readback,
            "closed": self._closed,
        }

    def probe(self, *, blocks_per_sm: int = 4, spin_cycles: int = 200_000) -> Dict[str, set]:
        """Run the SM-id probe on both streams at once; return the SM ids each reached.

        Launches ``blocks_per_sm * total_sms`` spinning blocks on each stream (so either
        side alone could cover the whole GPU) and waits for both. On a working
        ``green_ctx`` partition each side reaches at most its SM count and the two sets
        are disjoint, up to the 2 extra, shared SMs CUDA allows once a module with
        dynamic parallelism is loaded (:func:`check_probe`, :meth:`verify`). Ids lie in
        ``[0, %nsmid)`` (:func:`overlap._ext.sm_id_limit`), not necessarily below the SM
        count. CUDA build of the extension only.
        """
        from overlap import _ext

        self._check_open()
        if self.device.type != "cuda":
            raise PartitionUnavailableError("probe() runs on CUDA partitions only")
        if isinstance(blocks_per_sm, bool) or not isinstance(blocks_per_sm, int) or blocks_per_sm < 1:
            raise PartitionConfigError(f"blocks_per_sm must be a positive int, got {blocks_per_sm!r}")
        blocks = blocks_per_sm * self.total_sms
        current = torch.cuda.current_stream(self.device)
        self._comm_stream.wait_stream(current)
        self._compute_stream.wait_stream(current)
        ids = {
            "comm": _ext.smid_probe(blocks, device=self.device, spin_cycles=spin_cycles,
                                    stream=self._comm_stream),
            "compute": _ext.smid_probe(blocks, device=self.device, spin_cycles=spin_cycles,
                                       stream=self._compute_stream),
        }
        self._comm_stream.synchronize()
        self._compute_stream.synchronize()
        return {side: set(t.cpu().tolist()) for side, t in ids.items()}

    def verify(self, *, blocks_per_sm: int = 4, spin_cycles: int = 200_000) -> ProbeCheck:
        """:meth:`probe` both sides and :func:`check_probe` the result against this
        partition's counts, with ids validated against the device's ``%nsmid``."""
        from overlap import _ext

        seen = self.probe(blocks_per_sm=blocks_per_sm, spin_cycles=spin_cycles)
        return check_probe(seen, comm_sms=self.comm_sms, compute_sms=self.compute_sms,
                           sm_id_limit=_ext.sm_id_limit(self.device), enforced=self.enforced)

    def close(self) -> None:
        """Release the green contexts and streams (idempotent). Pending work on the two
        streams is waited for first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.device.type == "cuda":
                for stream in (self._comm_stream, self._compute_stream):
                    try:
                        stream.synchronize()
                    except RuntimeError as exc:
                        log.warning("SMPartition.close: stream synchronize failed: %s", exc)
            if self._finalizer is not None:
                self._finalizer()  # destroys streams then contexts (csrc/cuda/green_ctx.cu)
                self._finalizer = None
            self._handle = None  # torch's GreenContext is destroyed with its last reference
            self._comm_stream = self._compute_stream = None

    def __enter__(self) -> "SMPartition":
        self._check_open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (f"SMPartition(device={self.device}, backend={self.backend!r}, comm_sms={self.comm_sms}, "
                f"compute_sms={self.compute_sms}, total_sms={self.total_sms}, "
                f"enforced={self.enforced!r}, {state})")


# ---- NCCL's SM use ---------------------------------------------------------------------

def _check_ctas(max_ctas: Optional[int], min_ctas: Optional[int]) -> None:
    for name, value in (("max_ctas", max_ctas), ("min_ctas", min_ctas)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= NCCL_MAX_CTAS_LIMIT:
            raise PartitionConfigError(f"{name} must be an int in [1, {NCCL_MAX_CTAS_LIMIT}] "
                                       f"(NCCL's cap), got {value!r}")
    if max_ctas is not None and min_ctas is not None and min_ctas > max_ctas:
        raise PartitionConfigError(f"min_ctas={min_ctas} exceeds max_ctas={max_ctas}")


def nccl_max_ctas_of(value) -> Optional[int]:
    """The NCCL CTA cap a caller asked for: ``None`` (NCCL's default, or
    ``$NCCL_MAX_CTAS``), an int in ``[1, 64]``, or an :class:`SMPartition` (its
    :attr:`~SMPartition.nccl_max_ctas`).

    Raises:
        PartitionConfigError: anything else (the message says what to pass).
    """
    if value is None:
        return None
    if isinstance(value, SMPartition):
        return value.nccl_max_ctas
    _check_ctas(value, None)
    return value


def nccl_cta_env(max_ctas: Optional[int] = None, min_ctas: Optional[int] = None) -> Dict[str, str]:
    """Environment variables limiting the CTAs (hence SMs) each NCCL kernel uses.

    ``{"NCCL_MAX_CTAS": ..., "NCCL_MIN_CTAS": ...}`` for the given values. They apply to
    every communicator created *after* they are set, in this process (set them before
    ``init_process_group``, or export them to ``torchrun``).
    """
    _check_ctas(max_ctas, min_ctas)
    env = {}
    if max_ctas is not None:
        env["NCCL_MAX_CTAS"] = str(max_ctas)
    if min_ctas is not None:
        env["NCCL_MIN_CTAS"] = str(min_ctas)
    return env


def apply_nccl_cta_env(max_ctas: Optional[int] = None, min_ctas: Optional[int] = None, *,
                       overwrite: bool = False) -> Dict[str, str]:
    """Set :func:`nccl_cta_env` in ``os.environ``; return what was set.

    An existing different value is kept (with a warning) unless ``overwrite=True``:
    the launcher's environment usually knows best.
    """
    applied = {}
    for key, value in nccl_cta_env(max_ctas, min_ctas).items():
        old = os.environ.get(key)
        if old is not None and old != value and not overwrite:
            log.warning("%s is already %s; keeping it (pass overwrite=True to set %s)", key, old, value)
            continue
        os.environ[key] = value
        applied[key] = value
    return applied


def nccl_process_group_options(max_ctas: Optional[int] = None, min_ctas: Optional[int] = None,
                               *, high_priority_stream: bool = True):
    """``torch.distributed.ProcessGroupNCCL.Options`` with CTA limits and stream priority.

    Sets ``options.config.max_ctas`` / ``min_ctas`` (NCCL's ``ncclConfig_t.maxCTAs`` /
    ``minCTAs``, per communicator, NCCL >= 2.17) and ``is_high_priority_stream`` (NCCL
    kernels on a high-priority stream). The cap bounds how many CTAs (about one SM each)
    every kernel of the communicator occupies; it does not choose the SMs: kernels of
    asynchronous operations run on ProcessGroupNCCL's internal stream, outside any green
    context. Use it for the communication process group::

        opts = nccl_process_group_options(max_ctas=part.comm_sms)
        comm_group = torch.distributed.new_group(ranks, backend="nccl", pg_options=opts)

    Raises:
        PartitionUnavailableError: this torch has no NCCL, or its NCCL config has no CTA
            fields -- use :func:`apply_nccl_cta_env` instead.
    """
    _check_ctas(max_ctas, min_ctas)
    import torch.distributed as dist

    pg_nccl = getattr(dist, "ProcessGroupNCCL", None) if dist.is_available() else None
    if pg_nccl is None:
        raise PartitionUnavailableError(f"torch {torch.__version__} is built without NCCL; "
                                        "use apply_nccl_cta_env() or gloo on CPU")
    options = pg_nccl.Options()
    options.is_high_priority_stream = bool(high_priority_stream)
    if max_ctas is not None or min_ctas is not None:
        config = getattr(options, "config", None)
        if config is None or not hasattr(config, "max_ctas"):
            raise PartitionUnavailableError("this torch's ProcessGroupNCCL.Options has no "
                                            "config.max_ctas (NCCL < 2.17); use apply_nccl_cta_env()")
        if max_ctas is not None:
            config.max_ctas = max_ctas
        if min_ctas is not None:
            config.min_ctas = min_ctas
    return options
