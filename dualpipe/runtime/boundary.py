"""What crosses a stage boundary: message tags, the optional shape/dtype declarations
(:func:`set_p2p_tensor_shapes`, :func:`set_p2p_tensor_dtype`) and the gradient layout
message (which input gradients are ``None``).

Shapes and dtypes themselves travel as :func:`overlap.p2p.pack_meta` messages, once per
boundary and input signature (:mod:`dualpipe.runtime.executor` sends and caches them).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from overlap.p2p import META_LEN, TensorMeta

__all__ = ["set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]

# message tags on a pipeline's transports
TAG_F, TAG_B, TAG_META = 1, 2, 3
TAG_MASK = 5  # which input gradients are None (4: reduce_dualpipe_grads)

# the declarations (module state: they hold for every pipeline of the process)
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


def check_declared(metas: list[TensorMeta]) -> None:
    """What a stage sends against set_p2p_tensor_shapes/dtype (the caller's failure
    path names the rank and the action)."""
    if _p2p_shapes is not None and [m.shape for m in metas] != _p2p_shapes:
        raise ValueError(f"the stage sends shapes {[list(m.shape) for m in metas]} but "
                         f"set_p2p_tensor_shapes declared {[list(s) for s in _p2p_shapes]}")
    if _p2p_dtype is not None and any(m.dtype != _p2p_dtype for m in metas
                                      if m.dtype.is_floating_point):
        raise ValueError(f"the stage sends dtypes {[str(m.dtype) for m in metas]} but "
                         f"set_p2p_tensor_dtype declared {_p2p_dtype}")


def pack_mask(mask: tuple, device) -> torch.Tensor:
    """``int64[META_LEN]``: ``[n, 1 if gradient i is there else 0, ...]``."""
    if len(mask) >= META_LEN:
        raise ValueError(f"a stage boundary carries {len(mask)} tensors that need a gradient; "
                         f"at most {META_LEN - 1} fit")
    out = torch.zeros(META_LEN, dtype=torch.int64)
    out[0] = len(mask)
    out[1: 1 + len(mask)] = torch.tensor([int(b) for b in mask], dtype=torch.int64)
    return out.to(device)


def unpack_mask(t: torch.Tensor) -> tuple | bool:
    """The mask of :func:`pack_mask`; ``True`` when every gradient is there."""
    words = t.tolist()
    mask = tuple(bool(w) for w in words[1: 1 + words[0]])
    return True if all(mask) else mask


def mask_text(mask: tuple) -> str:
    return "[" + ", ".join("grad" if b else "None" for b in mask) + "]"


def sig(tensors: Sequence[Any]) -> str:
    """The input signature: dtype and shape of each tensor (``None`` for a missing one)."""
    return ";".join(f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else "None"
                    for t in tensors)
