"""What this installation can do: the compiled extension, green contexts, Triton.

:func:`build_info` answers without touching a GPU and without importing triton (its
version comes from the package metadata), so it is cheap enough for ``--version``.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
from typing import Dict, List, Optional

import torch

log = logging.getLogger(__name__)

__all__ = ["build_info", "build_hint", "format_build_info"]


def _triton_version() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return None
    try:
        return importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:  # importable but not pip-installed
        return "unknown"


def _torch_green_contexts() -> bool:
    """torch exposes green contexts with per-context streams (torch >= 2.12 on CUDA)."""
    module = getattr(torch.cuda, "green_contexts", None)
    cls = getattr(module, "GreenContext", None)
    return bool(cls is not None and getattr(module, "SUPPORTED", False) and hasattr(cls, "Stream"))


def _archs(text: str) -> List[str]:
    return [a for a in text.replace(";", ",").replace(" ", ",").split(",") if a]


def build_info() -> Dict[str, object]:
    """A dict describing the build.

    Keys:
        ``extension``: ``"cuda"``, ``"cpu"`` or ``"none"`` (which build of ``overlap._C``
        loaded); ``extension_error``: why it did not load, else ``None``;
        ``extension_torch_version``: torch the extension was compiled against;
        ``cuda_archs``: compute capabilities it was compiled for (e.g. ``["9.0"]``);
        ``torch_version``; ``torch_cuda``: CUDA version of torch (``None`` on CPU builds);
        ``torch_green_contexts``: ``torch.cuda.green_contexts`` with ``Stream()`` exists;
        ``triton``: importable (>= 3.0 is needed by ``overlap.kernels``);
        ``triton_version``; ``triton_interpret``: ``TRITON_INTERPRET`` is set.
    """
    from overlap import _ext

    module = _ext.load_extension()
    triton_version = _triton_version()
    return {
        "extension": _ext.extension_kind(),
        "extension_error": _ext.extension_error(),
        "extension_torch_version": getattr(module, "TORCH_VERSION", None) if module else None,
        "cuda_archs": _archs(getattr(module, "CUDA_ARCHS", "")) if module else [],
        "torch_version": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "torch_green_contexts": _torch_green_contexts(),
        "triton": triton_version is not None,
        "triton_version": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
    }


def build_hint(info: Dict[str, object]) -> Optional[str]:
    """What to do when the build lacks something the installed torch could use, else None."""
    if info["extension"] == "none":
        return ("the extension is not loaded, so the shared-memory transport and the CUDA "
                "kernels are off (pure-torch fallbacks). In a checkout: ./run setup (builds it "
                "in place); installed: pip install --no-build-isolation . with torch already "
                "installed")
    if info["extension"] == "cpu" and info["torch_cuda"]:
        return (f"torch has CUDA {info['torch_cuda']} but the extension is a CPU build (nvcc "
                "was not found when it was built, or DUALPIPE_NO_CUDA was set): set CUDA_HOME "
                "to a CUDA toolkit and rebuild (DUALPIPE_REBUILD=1 ./run setup)")
    return None


def format_build_info(info: Optional[Dict[str, object]] = None) -> str:
    """One ``key: value`` line per entry, for CLIs, and a ``hint:`` line when
    :func:`build_hint` has one."""
    info = build_info() if info is None else info
    lines = [f"{key}: {value}" for key, value in info.items()]
    hint = build_hint(info)
    if hint:
        lines.append(f"hint: {hint}")
    return "\n".join(lines)
