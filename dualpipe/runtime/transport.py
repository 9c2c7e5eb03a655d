"""The pipeline's policy for its transports; choosing and opening one is
:mod:`overlap.connect` (beside the transports).

Here: ``transport=`` resolved against ``$DUALPIPE_TRANSPORT``, the shared-memory ring
size from ``$DUALPIPE_SHM_RING_BYTES``, the store prefix of each pipeline built on a group
(:func:`next_prefix`: unique per pipeline, since ranks build pipelines in the same
order), and a setup failure turned into the :class:`PipelineError` (or
:class:`PipelineTimeout`) every rank raises (:func:`setup_error`).

The pipeline's traffic never goes over the user's process group: a failure then drops
the private transports, which closes their connections so every rank stops at once,
while the user's group (and the store rank 0 hosts) stays usable.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from overlap.connect import MODES, Connection, TransportSetupError, check_mode, open_transport
from overlap.shm import DEFAULT_RING_BYTES

from .errors import PipelineError, PipelineTimeout

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
    and checked against the backend and the stages' device
    (:func:`overlap.connect.check_mode`: ``ValueError``)."""
    mode = transport
    if mode == "auto":
        mode = os.environ.get("DUALPIPE_TRANSPORT", "auto") or "auto"
    if mode != transport and mode not in MODES:
        raise ValueError(f"transport must be one of {list(MODES)}, got {mode!r} "
                         "(from $DUALPIPE_TRANSPORT)")
    return check_mode(mode, backend, device)


def connect(group, store, prefix: str, backend: str, device: torch.device, mode: str,
            rank: int, timeout: float, max_ctas: int | None) -> Connection:
    """Open the pipeline's transport (:func:`overlap.connect.open_transport`),
    collectively with every rank of ``group``; ``rank`` is this pipeline rank.

    A rank that never builds this pipeline, builds pipelines in another order, or fails
    or exits meanwhile makes the others raise :class:`PipelineError` here
    (:class:`PipelineTimeout` after ``timeout``), never a transport's or the store's own
    exception; ``ValueError`` (shared memory refused) is raised as it is."""
    try:
        return open_transport(group, store, prefix, backend=backend, device=device,
                              mode=mode, timeout=timeout, ring_bytes=ring_bytes,
                              max_ctas=max_ctas)
    except TransportSetupError as e:
        raise setup_error(e, rank, group.size(), timeout) from (e.__cause__ or e)


def setup_error(e: TransportSetupError, rank: int, world: int,
                timeout: float) -> PipelineError:
    """The error a rank raises when setting up the pipeline's transports fails: another
    rank did not arrive in time (:class:`PipelineTimeout`), failed or exited meanwhile
    (:class:`PipelineError`).  ``e`` says what failed; this says what to check."""
    msg = f"pipeline rank {rank}, building the pipeline: {e}; "
    if e.timed_out:
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
