"""Construction of a pipeline's transports: which one (shared memory, a private gloo
group, two private NCCL communicators, or the user's group itself), and building and
releasing the private ones.

The pipeline's traffic never goes over the user's process group: a failure then drops
the private transports, which closes their connections so every rank stops at once,
while the user's group (and the store rank 0 hosts) stays usable.  Their store prefix
(:func:`next_prefix`) is unique per pipeline built on a group (ranks build pipelines in
the same order).
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from overlap.p2p import P2P, PeerError, PeerTimeout
from overlap.shm import DEFAULT_RING_BYTES, ShmP2P, ShmUnavailable

from .errors import PipelineError, PipelineTimeout

log = logging.getLogger("dualpipe.runtime")

# transport= values -> overlap.shm.ShmP2P.create modes
TRANSPORTS = {"auto": "auto", "shm": "shm", "group": "off"}

# pipelines built per process group name (the store prefix of the next one)
_clone_count: dict[str, int] = {}


def next_prefix(group) -> str:
    """The store prefix of the next pipeline built on ``group`` (counts it)."""
    gname = str(getattr(group, "group_name", "") or "default")
    n = _clone_count[gname] = _clone_count.get(gname, 0) + 1
    return f"dualpipe/{gname}/{n}"


def ring_bytes() -> int:
    """Shared-memory ring size per rank pair: $DUALPIPE_SHM_RING_BYTES or the default."""
    v = os.environ.get("DUALPIPE_SHM_RING_BYTES", "")
    try:
        return int(v) if v else DEFAULT_RING_BYTES
    except ValueError:
        raise ValueError(f"DUALPIPE_SHM_RING_BYTES must be an integer number of bytes, "
                         f"got {v!r}") from None


def transport_mode(transport: str, backend: str, device: torch.device) -> str:
    """The ``transport=`` argument resolved ($DUALPIPE_TRANSPORT overrides ``"auto"``)
    and checked against the backend and the stages' device (``ValueError``)."""
    mode = transport
    if mode == "auto":
        mode = os.environ.get("DUALPIPE_TRANSPORT", "auto") or "auto"
    if mode not in TRANSPORTS:
        raise ValueError(f"transport must be one of {list(TRANSPORTS)}, got {mode!r}"
                         + ("" if transport == mode else " (from $DUALPIPE_TRANSPORT)"))
    if mode == "shm" and (backend != "gloo" or device.type != "cpu"):
        raise ValueError(f"transport='shm' moves CPU tensors between processes of one "
                         f"host; this pipeline uses {backend} with stages on "
                         f"{device}: use transport='auto' or 'group'")
    if backend == "nccl" and device.type != "cuda":
        raise ValueError("the process group uses NCCL but the stage modules are on "
                         f"{device}; move them to the rank's GPU")
    if backend == "gloo" and device.type == "cuda":
        raise ValueError("gloo cannot send CUDA tensors between ranks: use an NCCL "
                         "process group for modules on GPUs")
    return mode


def connect(group, store, prefix: str, backend: str, device: torch.device, mode: str,
            rank: int, timeout: float, max_ctas: int | None):
    """Build the pipeline's transports, collectively with every rank of ``group``:
    ``(name, shm, pg)`` -- ``name`` ``"shm"``, ``"gloo"``, ``"nccl"`` or the user's
    backend; ``shm`` the :class:`~overlap.shm.ShmP2P` or ``None``; ``pg`` the private
    gloo group, the ``(up, down)`` NCCL communicators, or ``None``.

    A rank that never builds this pipeline, builds pipelines in another order, or fails
    or exits meanwhile makes the others raise :class:`PipelineError` here
    (:class:`PipelineTimeout` after ``timeout``), never a transport's or the store's own
    exception; ``ValueError`` (shared memory refused) is raised as it is."""
    to = datetime.timedelta(seconds=float(timeout))
    num_ranks = group.size()
    shm = pg = None
    try:
        if backend == "gloo" and device.type == "cpu" and store is not None:
            # collective: every rank agrees on shared memory (all on one host, extension
            # built) or on the private gloo group below
            try:
                shm = ShmP2P.create(store, prefix, group.rank(), num_ranks,
                                    mode=TRANSPORTS[mode], timeout=timeout,
                                    ring_bytes=ring_bytes())
            except ShmUnavailable as e:
                raise ValueError(str(e)) from e
        if shm is not None:
            name = "shm"
        elif backend == "gloo":
            name = "gloo"
            pg = dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), group.rank(),
                                       num_ranks, to)
        elif backend == "nccl":  # unverified: no GPU has run this path yet
            name = "nccl"
            # the communicators' watchdog is a backstop behind the host-side deadlines
            # (overlap.p2p.Handle): twice the timeout, so that a hang is reported as a
            # PipelineTimeout on every rank, not by the watchdog tearing a process down
            pg = nccl_groups(store, prefix, group.rank(), num_ranks, 2 * to, max_ctas)
        else:  # another backend: the user's group carries the traffic itself
            name = str(backend)
    except (ValueError, KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001 - another rank is missing, gone or failed
        raise setup_error(e, rank, num_ranks, timeout) from e
    return name, shm, pg


def p2p_of(group, shm, pg):
    """The object the executor posts transfers on: the shared-memory transport, a
    :class:`~overlap.p2p.P2P` over the private group(s), or over the user's group."""
    if shm is not None:
        return shm
    return P2P(group) if pg is None else P2P(backend=pg, rank=group.rank())


def nccl_groups(store, prefix: str, rank: int, size: int, timeout: datetime.timedelta,
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
        release_groups(made, failed=True)
        raise
    return tuple(made)


def release_groups(groups, failed: bool) -> None:
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


def setup_error(e: Exception, rank: int, world: int, timeout: float) -> PipelineError:
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


def group_store(group):
    """The store of ``group`` (older torch: the default store; ``None`` without one:
    failures are then reported locally only)."""
    try:
        return dist.distributed_c10d._get_process_group_store(group)
    except Exception:  # noqa: BLE001 - older torch: the default store
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - no store: failures are reported locally only
            return None


def store_host(group, rank_mapping) -> int | None:
    """The pipeline rank whose process hosts the process group's store: global rank 0
    (the TCPStore server under env:// and torchrun), if it is in ``group``."""
    try:
        return rank_mapping[dist.get_group_rank(group, 0)]
    except Exception:  # noqa: BLE001 - global rank 0 is not in this group
        return None
