"""What every kernel file in ``overlap.kernels`` shares.

* Triton is optional: without it (or with a 2.x) this module still imports, ``tl`` is a
  stub good enough for kernel signatures to parse, and :func:`require_triton` raises
  :class:`TritonUnavailableError` with what to install.
* The interpreter (``TRITON_INTERPRET=1``, how the kernels are tested on CPU) is read at
  *first launch*, not at import: :func:`lazy_kernel` applies ``triton.jit`` (and
  ``triton.autotune``) on first use, once per interpreter mode. With the usual
  import-time ``@triton.jit`` a test that sets the variable after something else
  imported the package would get compiled kernels that cannot run on CPU.
* ``DUALPIPE_TRITON_PIN=1`` (read at first launch too, see :func:`pinned`) hands
  ``triton.autotune`` only each kernel's known-good config from its space
  (:func:`autotune_space`), so a timed GPU check spends no time benchmarking configs
  (``scripts/gpu_check.py`` sets it). The configs generators still return the whole space.
* Kernel bodies call only ``triton.language`` *builtins* (``tl.full``, ``tl.minimum``,
  ``tl.dot``...), never its ``@triton.jit`` helpers (``tl.zeros``, ``tl.cdiv``,
  ``tl.sum``...): those were jitted when triton was imported, and if that happened before
  ``TRITON_INTERPRET=1`` was set the interpreter cannot call them
  ("Cannot call @triton.jit'd outside of the scope of a kernel").
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Dict, List, Optional, Sequence

import torch

try:
    import triton
    import triton.language as tl

    _MAJOR = int(triton.__version__.split(".")[0])
    HAS_TRITON = _MAJOR >= 3
    TRITON_ERROR: Optional[str] = (None if HAS_TRITON else
                                   f"triton {triton.__version__} is too old (need >= 3.0)")
except ImportError as _exc:  # pragma: no cover - exercised on machines without triton
    HAS_TRITON = False
    TRITON_ERROR = f"triton is not installed ({_exc})"
    triton = None

    class _LanguageStub:
        """Enough of triton.language for `X: tl.constexpr` annotations to evaluate."""

        constexpr = object
        float32 = float16 = bfloat16 = int32 = int64 = None

    tl = _LanguageStub()

__all__ = ["HAS_TRITON", "TRITON_ERROR", "TritonUnavailableError", "triton", "tl",
           "interpreting", "pinned", "autotune_space", "PIN_ENV", "require_triton",
           "check_launchable", "lazy_kernel", "LazyKernel"]

#: Environment variable that pins every kernel to its known-good config (no autotuning).
PIN_ENV = "DUALPIPE_TRITON_PIN"

_TRUE = ("1", "true", "yes", "on")


class TritonUnavailableError(RuntimeError):
    """A Triton kernel was called but triton (>= 3.0) cannot be imported."""


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def pinned() -> bool:
    """True when ``DUALPIPE_TRITON_PIN`` is set (``1``/``true``/``yes``/``on``): each
    kernel then autotunes over its single known-good config, i.e. not at all."""
    return os.environ.get(PIN_ENV, "0").strip().lower() in _TRUE


def autotune_space(configs: List, known_good: int) -> List:
    """What ``triton.autotune`` gets from a compiled kernel's space ``configs``: all of
    them, or ``[configs[known_good]]`` when :func:`pinned` (with one config the
    autotuner launches it without timing anything).

    ``known_good`` indexes a config that fits every dtype the kernel accepts on the GPUs
    the project targets (shared memory and registers included), so pinning never turns
    a working launch into an out-of-resources error.
    """
    if not 0 <= known_good < len(configs):
        raise IndexError(f"known_good={known_good} is outside the {len(configs)} configs")
    return [configs[known_good]] if pinned() else list(configs)


def require_triton(what: str) -> None:
    if not HAS_TRITON:
        raise TritonUnavailableError(f"{what} needs triton >= 3.0: {TRITON_ERROR}; "
                                     "`pip install triton` (on CPU, run with TRITON_INTERPRET=1)")


def check_launchable(what: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device that Triton can run on; returns that device."""
    require_triton(what)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"{what}: all tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type == "cpu" and not interpreting():
        raise ValueError(f"{what}: CPU tensors run only under the Triton interpreter; set "
                         "TRITON_INTERPRET=1 in the environment, or pass CUDA tensors")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what}: unsupported device {device}")
    return device


class LazyKernel:
    """A kernel function compiled with triton.jit (+ triton.autotune) on first launch.

    ``kernel[grid](...)`` works as with a ``@triton.jit`` function. ``configs(interpret)``
    returns the autotune configs (a single fixed one under the interpreter, where timing
    means nothing); ``key`` lists the arguments whose values select a tuned config;
    ``known_good`` indexes the compiled space's config kept when :func:`pinned`. One
    compiled kernel is kept per (interpreter, pinned) mode, both read at launch.
    """

    def __init__(self, fn: Callable, configs: Optional[Callable[[bool], List]] = None,
                 key: Sequence[str] = (), known_good: int = 0) -> None:
        self.fn = fn
        self.configs = configs
        self.key = list(key)
        self.known_good = known_good
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled: Dict[tuple, object] = {}
        self._lock = threading.Lock()

    def compiled(self):
        interpret = interpreting()
        mode = (interpret, pinned())
        kernel = self._compiled.get(mode)
        if kernel is None:
            with self._lock:
                kernel = self._compiled.get(mode)
                if kernel is None:
                    kernel = triton.jit(self.fn)
                    if self.configs is not None:
                        kernel = triton.autotune(configs=self.autotune_configs(interpret),
                                                 key=self.key)(kernel)
                    self._compiled[mode] = kernel
        return kernel

    def autotune_configs(self, interpret: bool) -> List:
        """The configs handed to ``triton.autotune`` in this mode (pinned: one)."""
        space = self.configs(interpret)
        return space if interpret else autotune_space(space, self.known_good)

    def __getitem__(self, grid):
        return self.compiled()[grid]


def lazy_kernel(configs: Optional[Callable[[bool], List]] = None, key: Sequence[str] = (),
                known_good: int = 0):
    """Decorator form of :class:`LazyKernel` (the function stays plain Python until used)."""

    def wrap(fn: Callable) -> LazyKernel:
        return LazyKernel(fn, configs, key, known_good)

    return wrap
