"""Runtime primitives to overlap computation with communication.

* :mod:`overlap.streams` -- compute/communication streams with priorities, events, and a
  CPU twin with the same interface;
* :mod:`overlap.trace` -- :class:`~overlap.trace.Interval`, one span of work on one rank:
  the trace data that timelines record and the simulator and drawer of ``dualpipe`` share;
* :mod:`overlap.timeline` -- record spans per lane (host clock or CUDA events) and measure
  hidden/exposed communication;
* :mod:`overlap.fb` -- declare a stage as sub-stages (compute / async comm) and get an
  interleaved ``overlapped_forward_backward`` for DualPipe;
* :mod:`overlap.transport` -- the transport interface (:class:`~overlap.transport.Transport`,
  the one handle type :class:`~overlap.transport.TransferHandle`, the ``Peer*`` failures);
* :mod:`overlap.p2p` -- asynchronous pipeline send/recv with a shape/dtype handshake;
* :mod:`overlap.shm` -- the same interface over shared memory, for ranks on one host;
* :mod:`overlap.connect` -- choosing and opening a transport for a process group
  (:func:`~overlap.connect.open_transport`: shared memory or private process groups);
* :mod:`overlap.partition` -- SM partitions between compute and communication;
* :mod:`overlap.kernels` -- Triton kernels taking an SM budget (imports triton);
* the extension's SM-budgeted ops (``sm_copy_``, ``gather_rows``, ``scatter_add_rows_``,
  ...) and the SM-budget rule they share with the kernels (:func:`overlap.device_sm_count`,
  :func:`overlap.sm_budget`), exported here from the private loader ``overlap._ext``;
* :func:`overlap.build_info` -- what the extension was built with.

Submodules are imported on first use (``import overlap`` imports no torch code and probes
no device); the names below are re-exported lazily.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
from typing import Any


def _map_checkout_kernels() -> None:
    """Make ``overlap.kernels`` importable from a source checkout.

    The Triton kernels sit in the checkout's top-level ``kernels/`` folder; an install maps
    them to ``overlap/kernels`` (pyproject.toml ``package-dir``).  Run from a checkout (the
    ``./run`` commands put it on ``PYTHONPATH`` instead of installing it), the same name is
    mapped onto that folder here, so both import the same modules.  Installed copies have
    ``overlap/kernels`` and are left alone."""
    here = os.path.dirname(os.path.realpath(__file__))
    root = os.path.dirname(here)
    src = os.path.join(root, "kernels")
    init = os.path.join(src, "__init__.py")
    if os.path.isdir(os.path.join(here, "kernels")) or not (
            os.path.isfile(init) and os.path.isfile(os.path.join(root, "pyproject.toml"))):
        return
    name = f"{__name__}.kernels"

    class _CheckoutKernels(importlib.abc.MetaPathFinder):
        dualpipe_checkout = src

        def find_spec(self, fullname, path=None, target=None):
            if fullname != name:
                return None
            return importlib.util.spec_from_file_location(name, init,
                                                          submodule_search_locations=[src])

    if not any(getattr(f, "dualpipe_checkout", None) == src for f in sys.meta_path):
        sys.meta_path.insert(0, _CheckoutKernels())


_map_checkout_kernels()

_EXPORTS = {
    "streams": ("HostStream", "StreamEvent", "StreamPair", "priority_range", "resolve_device"),
    "trace": ("Interval",),
    "timeline": ("Timeline", "OverlapStats", "IsolatedOverlap", "overlap_stats",
                 "overlap_per_window", "isolated_overlap", "hidden_fraction",
                 "overlap_efficiency", "exposed_comm", "compute_slowdown"),
    "fb": ("SubStage", "SubStageModule", "CommHandle", "Step", "compute", "comm",
           "run_async", "build_order", "overlapped_forward_backward",
           "plain_forward_backward", "defer_weight_grad", "WeightGradStore"),
    "partition": ("SMPartition", "SMGranularity", "PartitionError", "PartitionConfigError",
                  "PartitionUnavailableError", "PartitionClosedError", "round_comm_sms",
                  "nccl_process_group_options", "nccl_cta_env", "apply_nccl_cta_env"),
    "_ext": ("sm_copy_", "gather_rows", "scatter_add_rows_", "smid_probe", "sm_id_limit",
             "device_sm_count", "sm_budget", "extension_available", "extension_kind",
             "ExtensionUnavailableError"),
    "_build": ("build_info", "build_hint", "format_build_info"),
    "transport": ("Transport", "TransferHandle", "PeerError", "PeerTimeout", "PeerLost",
                  "PeerExited", "PeerAborted"),
    "p2p": ("P2P", "Handle", "TensorMeta"),
    "shm": ("ShmP2P", "ShmHandle", "ShmUnavailable", "DEFAULT_RING_BYTES"),
    "connect": ("open_transport", "Connection", "TransportSetupError"),
}
# submodules importable as attributes; ``kernels`` imports triton, so only on use
_SUBMODULES = ("streams", "trace", "timeline", "fb", "partition", "transport", "p2p", "shm",
               "connect", "adapters", "kernels")
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
