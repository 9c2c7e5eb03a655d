"""Loader of the compiled extension and the SM-budgeted data-movement ops built on it.

The extension ``overlap._C`` (sources in ``csrc/``, built by ``pip install``) registers
its ops as ``torch.ops.dualpipe_ext.*``. It is optional: every public function here has
a pure-torch fallback with the same results (bit for bit on CPU), so dualpipe/overlap run
without it. Nothing is loaded or probed at import time; the first call loads it.

Public functions (all take and return torch tensors; ``num_sms`` is the SM budget the
CUDA kernel may use, i.e. its grid size, ``None`` meaning every SM of the device):

* :func:`sm_copy_` -- ``dst.view(-1)[:] = src.view(-1)`` with a bounded SM footprint.
* :func:`gather_rows` -- ``src[index]`` (MoE dispatch: pick token rows by index).
* :func:`scatter_add_rows_` -- ``out[index[i]] += src[i]``, deterministic (MoE combine).
* :func:`device_sm_count` -- SMs of a device; :func:`sm_budget` -- the budget an op runs
  with (``num_sms`` checked, ``None`` = every SM), shared with the Triton kernels;
* :func:`smid_probe` -- which SMs the current stream's kernels reach (tests of partitions);
  :func:`sm_id_limit` -- the bound of those ids (``%nsmid``: ids need not be contiguous).

``use_extension``: ``None`` uses the extension's CUDA kernels for CUDA tensors when it
was built with CUDA and the torch implementation otherwise (on CPU it is bit-identical
and faster than the extension's CPU loops), ``True`` requires the extension (raises
:class:`ExtensionUnavailableError`; on CPU tensors it runs the CPU kernels), ``False``
forces the fallback (used by tests to compare the two).
"""
from __future__ import annotations

import importlib
import logging
import threading
from types import ModuleType
from typing import Optional

import torch

log = logging.getLogger(__name__)

__all__ = [
    "ExtensionUnavailableError",
    "load_extension",
    "extension_available",
    "extension_kind",
    "extension_error",
    "sm_copy_",
    "gather_rows",
    "scatter_add_rows_",
    "build_csr",
    "smid_probe",
    "sm_id_limit",
    "device_sm_count",
    "sm_budget",
]

_MODULE_NAME = "overlap._C"
_REBUILD_HINT = ("build it in the checkout with `./run setup` (in place), or install with "
                 "`pip install --no-build-isolation .` (see setup.py for DUALPIPE_NO_EXT / "
                 "DUALPIPE_NO_CUDA)")


def _checkout_note() -> str:
    """Where ``overlap`` was imported from a source checkout, say so: run from the
    checkout's root (``python -m bench...``), it shadows an installed copy and needs its
    own in-place build."""
    import os
    here = os.path.dirname(os.path.realpath(__file__))
    if os.path.isfile(os.path.join(os.path.dirname(here), "pyproject.toml")):
        return (f"; `overlap` was imported from the source checkout {os.path.dirname(here)} "
                "(which shadows any installed copy): build it there in place with `./run "
                "setup` or `python setup.py build_ext --inplace`")
    return ""

_lock = threading.Lock()
_state: dict = {"tried": False, "module": None, "error": None}

# dtypes the scatter-add kernels accumulate (others raise with a message saying so).
_SCATTER_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class ExtensionUnavailableError(RuntimeError):
    """The compiled extension (or its CUDA part) is needed for this call and is missing."""


def load_extension() -> Optional[ModuleType]:
    """Import ``overlap._C`` once; return it, or ``None`` if it is missing or unusable.

    A module built against a different torch than the one running is refused (its ops
    could crash); the reason is kept for :func:`extension_error`.
    """
    if _state["tried"]:
        return _state["module"]
    with _lock:
        if _state["tried"]:
            return _state["module"]
        module, error = None, None
        try:
            module = importlib.import_module(_MODULE_NAME)
        except ImportError as exc:
            error = f"{_MODULE_NAME} is not importable ({exc}){_checkout_note()}"
        if module is not None:
            built_for = getattr(module, "TORCH_VERSION", "")
            if built_for and built_for != torch.__version__:
                error = (f"{_MODULE_NAME} was built for torch {built_for} but torch "
                         f"{torch.__version__} is running; rebuild it")
                module = None
        if module is not None:
            _register_fakes()
            log.debug("loaded %s (cuda=%s)", _MODULE_NAME, bool(module.WITH_CUDA))
        else:
            log.info("dualpipe extension unavailable, using pure-torch fallbacks: %s", error)
        _state.update(tried=True, module=module, error=error)
        return module


def extension_available() -> bool:
    """True when the compiled extension is loaded (CPU or CUDA build)."""
    return load_extension() is not None


def extension_kind() -> str:
    """``"cuda"``, ``"cpu"`` (a CPU-only build) or ``"none"``."""
    module = load_extension()
    if module is None:
        return "none"
    return "cuda" if module.WITH_CUDA else "cpu"


def extension_error() -> Optional[str]:
    """Why the extension is not loaded (``None`` when it is)."""
    load_extension()
    return _state["error"]


def _require(what: str, need_cuda: bool = False) -> ModuleType:
    module = load_extension()
    if module is None:
        raise ExtensionUnavailableError(f"{what} needs the dualpipe extension: {_state['error']}; "
                                        f"{_REBUILD_HINT}")
    if need_cuda and not module.WITH_CUDA:
        raise ExtensionUnavailableError(f"{what} needs the CUDA build of the dualpipe extension, "
                                        f"this one is CPU-only; {_REBUILD_HINT} on a machine with "
                                        "nvcc and a CUDA torch")
    return module


def _register_fakes() -> None:
    """Meta/fake kernels so torch.compile and FakeTensor tracing see the ops."""
    register = getattr(torch.library, "register_fake", None) or getattr(torch.library, "impl_abstract", None)
    if register is None:  # pragma: no cover - torch < 2.2, below our floor
        return

    def gather_rows_fake(src, index, num_blocks):
        return src.new_empty((index.shape[0], *src.shape[1:]))

    def mutating_fake(*args):
        return None

    fakes = {
        "dualpipe_ext::gather_rows": gather_rows_fake,
        "dualpipe_ext::sm_copy_": mutating_fake,
        "dualpipe_ext::scatter_add_rows_csr_": mutating_fake,
        "dualpipe_ext::smid_probe_": mutating_fake,
        "dualpipe_ext::nsmid_": mutating_fake,
    }
    for name, fn in fakes.items():
        try:
            register(name)(fn)
        except Exception as exc:  # already registered (reload) or an API change
            log.debug("could not register a fake kernel for %s: %s", name, exc)


# ---- helpers -------------------------------------------------------------------------

_sm_counts: dict = {}


def device_sm_count(device: torch.device) -> int:
    """Number of SMs of a CUDA device (cached); 1 for CPU (the CPU ops ignore budgets)."""
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_counts:
        _sm_counts[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_counts[index]


def sm_budget(num_sms: Optional[int], device: torch.device) -> int:
    """The SM budget an op on ``device`` runs with: ``num_sms`` itself (a positive int,
    else ``ValueError``), or every SM of the device (:func:`device_sm_count`) for ``None``.
    The one rule the extension's ops and the Triton kernels (``overlap.kernels``) share;
    their CUDA grids are at most this many blocks."""
    if num_sms is None:
        return device_sm_count(device)
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f"num_sms must be a positive int (the SM budget), got {num_sms!r}")
    return num_sms


def _use_ext(use_extension: Optional[bool], what: str, tensor: torch.Tensor) -> bool:
    if use_extension is False:
        return False
    if use_extension is True:
        _require(what, need_cuda=tensor.is_cuda)
        return True
    if not tensor.is_cuda:
        # automatic choice on CPU: the torch implementation (bit-identical, and faster
        # than the extension's plain CPU loops: 0.37 vs 2.15 ms for scatter_add_rows_
        # in bench/results/micro.md); use_extension=True still runs the CPU kernels
        return False
    module = load_extension()
    return module is not None and bool(module.WITH_CUDA)


def _check_index(index: torch.Tensor, rows: int, name: str, check_bounds: Optional[bool]) -> None:
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor, got "
                         f"{getattr(index, 'shape', type(index).__name__)}")
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 or int32, got {index.dtype}")
    if check_bounds is None:
        check_bounds = not index.is_cuda  # free on CPU; a device sync on CUDA
    if check_bounds and index.numel() > 0:
        low, high = int(index.min()), int(index.max())
        if low < 0 or high >= rows:
            raise IndexError(f"{name} values must be in [0, {rows}), got min {low} max {high}")


def _same_device(*tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


# ---- ops -----------------------------------------------------------------------------

def sm_copy_(dst: torch.Tensor, src: torch.Tensor, *, num_sms: Optional[int] = None,
             use_extension: Optional[bool] = None) -> torch.Tensor:
    """Copy ``src`` into ``dst`` using at most ``num_sms`` SMs; return ``dst``.

    Args:
        dst: contiguous tensor, written in place.
        src: contiguous tensor on the same device with the same dtype and number of
            elements (shapes may differ: the copy is flat).
        num_sms: grid size of the CUDA kernel (blocks of 512 threads); ``None`` = all SMs.
            Ignored on CPU.
    """
    _same_device(dst, src)
    if dst.dtype != src.dtype or dst.numel() != src.numel():
        raise ValueError(f"sm_copy_ needs equal dtype and numel: dst {dst.dtype}{tuple(dst.shape)}, "
                         f"src {src.dtype}{tuple(src.shape)}")
    if not (dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("sm_copy_ needs contiguous tensors; call .contiguous() first")
    budget = sm_budget(num_sms, dst.device)
    if _use_ext(use_extension, "sm_copy_", dst):
        torch.ops.dualpipe_ext.sm_copy_(dst, src, budget)
    else:
        dst.view(-1).copy_(src.view(-1))
    return dst


def gather_rows(src: torch.Tensor, index: torch.Tensor, *, num_sms: Optional[int] = None,
                check_bounds: Optional[bool] = None,
                use_extension: Optional[bool] = None) -> torch.Tensor:
    """Return ``src[index]``: rows of ``src`` picked by ``index`` (exact copy of the bytes).

    Args:
        src: ``[N, ...]`` contiguous tensor of any dtype.
        index: ``[M]`` int64/int32 on the same device, values in ``[0, N)``.
        num_sms: SM budget (grid size) of the CUDA kernel; ``None`` = all SMs.
        check_bounds: validate ``index`` first (raises ``IndexError``). ``None`` checks on
            CPU only, where it costs no device synchronization.
    Returns:
        ``[M, ...]`` tensor, same dtype and device as ``src``.
    """
    if src.dim() < 1:
        raise ValueError("gather_rows needs src with at least one dimension")
    _same_device(src, index)
    _check_index(index, src.shape[0], "index", check_bounds)
    if not src.is_contiguous():
        raise ValueError("gather_rows needs a contiguous src; call .contiguous() first")
    budget = sm_budget(num_sms, src.device)
    if _use_ext(use_extension, "gather_rows", src):
        return torch.ops.dualpipe_ext.gather_rows(src, index.contiguous(), budget)
    return torch.index_select(src, 0, index)


def build_csr(index: torch.Tensor, num_rows: int) -> tuple:
    """CSR form of a row scatter: ``(order, offsets)`` with int64 entries.

    ``order`` lists source rows grouped by destination row, each group in increasing
    source order (stable sort); destination ``r`` receives ``order[offsets[r]:offsets[r+1]]``.
    """
    sorted_index, order = torch.sort(index.to(torch.int64), stable=True)
    bounds = torch.arange(num_rows + 1, device=index.device, dtype=torch.int64)
    offsets = torch.searchsorted(sorted_index, bounds)
    return order, offsets


def scatter_add_rows_(out: torch.Tensor, src: torch.Tensor, index: torch.Tensor, *,
                      num_sms: Optional[int] = None, check_bounds: Optional[bool] = None,
                      use_extension: Optional[bool] = None) -> torch.Tensor:
    """``out[index[i]] += src[i]`` for every row ``i``, deterministically; return ``out``.

    Every destination row sums its contributions in increasing ``i`` order, accumulating
    in float32 (float64 for float64 tensors) starting from its current value and rounding
    once to the dtype. The CUDA and CPU kernels and the pure-torch fallback on CPU give
    bit-identical results; the fallback on CUDA (index_add_ with atomics) can differ in
    the last bits when an index repeats.

    Args:
        out: ``[N, ...]`` contiguous float32/float64/bfloat16/float16, updated in place.
        src: ``[M, ...]`` same dtype, device and trailing shape as ``out``.
        index: ``[M]`` int64/int32, values in ``[0, N)``; repeats allowed.
        num_sms: SM budget (grid size) of the CUDA kernel; ``None`` = all SMs.
        check_bounds: as in :func:`gather_rows`.
    """
    if out.dim() < 1 or src.dim() != out.dim() or src.shape[1:] != out.shape[1:]:
        raise ValueError(f"scatter_add_rows_ needs out [N, ...] and src [M, ...] with equal "
                         f"trailing dims, got {tuple(out.shape)} and {tuple(src.shape)}")
    if out.dtype != src.dtype:
        raise TypeError(f"out is {out.dtype} but src is {src.dtype}; cast src to {out.dtype}")
    if out.dtype not in _SCATTER_DTYPES:
        raise TypeError(f"scatter_add_rows_ supports {[str(d) for d in _SCATTER_DTYPES]}, got {out.dtype}")
    _same_device(out, src, index)
    _check_index(index, out.shape[0], "index", check_bounds)
    if index.shape[0] != src.shape[0]:
        raise ValueError(f"index has {index.shape[0]} entries but src has {src.shape[0]} rows")
    if not (out.is_contiguous() and src.is_contiguous()):
        raise ValueError("scatter_add_rows_ needs contiguous out and src; call .contiguous() first")
    budget = sm_budget(num_sms, out.device)
    if _use_ext(use_extension, "scatter_add_rows_", out):
        order, offsets = build_csr(index, out.shape[0])
        torch.ops.dualpipe_ext.scatter_add_rows_csr_(out, src, order, offsets, budget)
        return out
    acc_dtype = torch.float64 if out.dtype == torch.float64 else torch.float32
    acc = out.to(acc_dtype)
    acc.index_add_(0, index, src.to(acc_dtype))
    out.copy_(acc)
    return out


def smid_probe(num_blocks: int, *, device=None, spin_cycles: int = 200_000,
               stream: Optional[torch.cuda.Stream] = None) -> torch.Tensor:
    """Launch ``num_blocks`` one-warp blocks that each record the SM they ran on.

    The blocks busy-wait ``spin_cycles`` GPU clock cycles first so that many are resident
    at once and the scheduler spreads them over every SM it may use. Returns an int32
    CUDA tensor ``[num_blocks]`` of SM ids, filled asynchronously on ``stream`` (default:
    the current stream); synchronize before reading it. CUDA build of the extension only.
    """
    _require("smid_probe", need_cuda=True)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
        raise ValueError(f"num_blocks must be a positive int, got {num_blocks!r}")
    if not isinstance(spin_cycles, int) or spin_cycles < 0:
        raise ValueError(f"spin_cycles must be a non-negative int, got {spin_cycles!r}")
    device = torch.device(device) if device is not None else (
        stream.device if stream is not None else torch.device("cuda", torch.cuda.current_device()))
    if device.type != "cuda":
        raise ValueError(f"smid_probe runs on CUDA devices, got {device}")
    with torch.cuda.device(device), torch.cuda.stream(stream):  # stream=None: current one
        out = torch.full((num_blocks,), -1, dtype=torch.int32, device=device)
        torch.ops.dualpipe_ext.smid_probe_(out, spin_cycles)
    return out


_sm_id_limits: dict = {}


def sm_id_limit(device=None) -> int:
    """``%nsmid`` of a CUDA device: every SM id :func:`smid_probe` can return is in
    ``[0, sm_id_limit)``.  SM ids need not be contiguous, so this bound may exceed the
    device's SM count (``multi_processor_count``); size and validate id sets with it.
    Read once per device with a one-block kernel (a synchronization), then cached.
    CUDA build of the extension only."""
    _require("sm_id_limit", need_cuda=True)
    device = torch.device(device) if device is not None else \
        torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda":
        raise ValueError(f"sm_id_limit needs a CUDA device, got {device}")
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_id_limits:
        with torch.cuda.device(index):
            out = torch.zeros(1, dtype=torch.int32, device=torch.device("cuda", index))
            torch.ops.dualpipe_ext.nsmid_(out)
            _sm_id_limits[index] = int(out.item())
    return _sm_id_limits[index]
