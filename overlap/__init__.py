"""Runtime primitives to overlap computation with communication.

* :mod:`overlap.streams` -- compute/communication streams with priorities, events, and a
  CPU twin with the same interface;
* :mod:`overlap.timeline` -- record spans per lane (host clock or CUDA events) and measure
  hidden/exposed communication;
* :mod:`overlap.fb` -- declare a stage as sub-stages (compute / async comm) and get an
  interleaved ``overlapped_forward_backward`` for DualPipe;
* :mod:`overlap.p2p` -- asynchronous pipeline send/recv with a shape/dtype handshake;
* :mod:`overlap.shm` -- the same interface over shared memory, for ranks on one host;
* :mod:`overlap.partition` -- SM partitions between compute and communication;
* :mod:`overlap.kernels` -- Triton kernels taking an SM budget (imports triton);
* :func:`overlap.build_info` -- what the extension was built with.

Submodules are imported on first use (``import overlap`` imports no torch code and probes
no device); the names below are re-exported lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "streams": ("HostStream", "StreamEvent", "StreamPair", "priority_range", "resolve_device"),
    "timeline": ("Timeline", "OverlapStats", "IsolatedOverlap", "overlap_stats",
                 "overlap_per_window", "isolated_overlap", "hidden_fraction",
                 "overlap_efficiency", "exposed_comm", "compute_slowdown"),
    "fb": ("SubStage", "SubStageModule", "CommHandle", "Step", "compute", "comm",
           "run_async", "build_order", "overlapped_forward_backward",
           "plain_forward_backward", "defer_weight_grad"),
    "partition": ("SMPartition", "SMGranularity", "PartitionError", "PartitionConfigError",
                  "PartitionUnavailableError", "PartitionClosedError", "round_comm_sms",
                  "nccl_process_group_options", "nccl_cta_env", "apply_nccl_cta_env"),
    "_ext": ("sm_copy_", "gather_rows", "scatter_add_rows_", "smid_probe", "sm_id_limit",
             "extension_available", "extension_kind", "ExtensionUnavailableError"),
    "_build": ("build_info", "format_build_info"),
    "p2p": ("P2P", "Handle", "TensorMeta", "PeerError", "PeerTimeout", "PeerLost", "PeerExited",
            "PeerAborted"),
    "shm": ("ShmP2P", "ShmHandle", "ShmUnavailable", "DEFAULT_RING_BYTES"),
}
# submodules importable as attributes; ``kernels`` imports triton, so only on use
_SUBMODULES = ("streams", "timeline", "fb", "partition", "p2p", "shm", "adapters", "kernels")
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE) + list(_SUBMODULES)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
