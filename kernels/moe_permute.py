"""SM-budgeted token permute / unpermute for MoE dispatch and combine.

Routing a batch of ``T`` tokens to ``top-k`` of ``E`` experts (see :func:`moe_dispatch_index`):

* **permute** (before dispatch): ``x_perm[i] = x[src_index[i]]``, the ``T*k`` token copies
  grouped by expert, so each expert's tokens are contiguous -- :func:`moe_permute`;
* **unpermute** (after combine): ``out[t] = sum_j weights[t, j] * y[combine_index[t, j]]``,
  the weighted sum of each token's expert outputs, accumulated in float32 --
  :func:`moe_unpermute`. Entries ``combine_index[t, j] < 0`` (dropped tokens) are skipped.

Both kernels are persistent: the grid is ``min(num_sms, rows)`` programs and each walks
rows ``pid, pid + grid, ...``, so they run inside an SM budget (e.g. the communication
side of an :class:`overlap.partition.SMPartition` when they feed an all-to-all, or the
compute side). The gather form of combine needs no atomics and is deterministic.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from overlap import sm_budget  # the SM-budget rule of the extension's ops (one for both)

from ._triton_support import check_launchable, lazy_kernel, tl, triton

__all__ = ["moe_permute", "moe_unpermute", "moe_dispatch_index", "permute_configs",
           "PINNED_PERMUTE"]

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: Index of the config ``DUALPIPE_TRITON_PIN=1`` keeps (1024-wide chunks, 4 warps: no
#: shared memory, a few registers per element; fits any GPU).
PINNED_PERMUTE = 1


def permute_configs(interpret: bool) -> List["triton.Config"]:
    """Autotune space over the hidden-dim chunk; one small chunk under the interpreter.
    With ``DUALPIPE_TRITON_PIN`` set the kernels are tuned over ``[space[PINNED_PERMUTE]]``."""
    if interpret:
        return [triton.Config({"BLOCK_H": 32}, num_warps=1)]
    return [triton.Config({"BLOCK_H": bh}, num_warps=w)
            for bh, w in ((512, 4), (1024, 4), (2048, 8), (4096, 8))]


@lazy_kernel(configs=permute_configs, key=["H", "sm_budget"], known_good=PINNED_PERMUTE)
def _permute_kernel(x_ptr, index_ptr, out_ptr, rows, H, stride_x, stride_out, sm_budget,
                    BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    for row in range(pid, rows, programs):
        src = tl.load(index_ptr + row).to(tl.int64)
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + cols
            mask = offs < H
            values = tl.load(x_ptr + src * stride_x + offs, mask=mask)
            tl.store(out_ptr + tl.cast(row, tl.int64) * stride_out + offs, values, mask=mask)


@lazy_kernel(configs=permute_configs, key=["H", "TOPK", "sm_budget"],
             known_good=PINNED_PERMUTE)
def _unpermute_kernel(y_ptr, index_ptr, weight_ptr, out_ptr, tokens, H, stride_y, stride_out,
                      sm_budget, TOPK: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                      BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_H)
    for token in range(pid, tokens, programs):
        for h0 in range(0, H, BLOCK_H):
            offs = h0 + cols
            mask = offs < H
            acc = tl.full((BLOCK_H,), 0.0, tl.float32)
            for j in tl.static_range(TOPK):
                src = tl.load(index_ptr + token * TOPK + j).to(tl.int64)
                # Compare a vector, not a scalar: the interpreter mis-types scalar & vector masks.
                row_mask = mask & ((tl.full((BLOCK_H,), 0, tl.int64) + src) >= 0)
                values = tl.load(y_ptr + tl.maximum(src, 0) * stride_y + offs, mask=row_mask, other=0.0)
                values = values.to(tl.float32)
                if HAS_WEIGHTS:
                    values = values * tl.load(weight_ptr + token * TOPK + j).to(tl.float32)
                acc += values
            tl.store(out_ptr + tl.cast(token, tl.int64) * stride_out + offs,
                     acc.to(out_ptr.dtype.element_ty), mask=mask)


def _rows_2d(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {tuple(t.shape)}")
    if t.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along the hidden dim; call .contiguous()")


def moe_permute(x: torch.Tensor, src_index: torch.Tensor, *, num_sms: Optional[int] = None,
                check_bounds: Optional[bool] = None) -> torch.Tensor:
    """Gather token rows into expert order: ``out[i] = x[src_index[i]]`` (exact copy).

    Args:
        x: ``[T, H]`` tokens (any dtype), unit stride along ``H``.
        src_index: ``[R]`` int32/int64 in ``[0, T)`` (``R = T * top_k`` for a dispatch,
            from :func:`moe_dispatch_index`).
        num_sms: SM budget = maximum grid size; ``None`` = all SMs (1 program on CPU).
        check_bounds: validate ``src_index`` (``IndexError``); ``None`` = only on CPU,
            where it costs no device synchronization.
    Returns:
        ``[R, H]`` tensor of ``x``'s dtype.
    """
    device = check_launchable("moe_permute", x, src_index)
    _rows_2d("x", x)
    if src_index.dim() != 1 or src_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"src_index must be a 1-D int32/int64 tensor, got {src_index.dtype} "
                         f"{tuple(src_index.shape)}")
    budget = sm_budget(num_sms, device)
    if (check_bounds if check_bounds is not None else device.type == "cpu") and src_index.numel():
        low, high = int(src_index.min()), int(src_index.max())
        if low < 0 or high >= x.shape[0]:
            raise IndexError(f"src_index values must be in [0, {x.shape[0]}), got [{low}, {high}]")
    rows, H = src_index.shape[0], x.shape[1]
    out = torch.empty((rows, H), dtype=x.dtype, device=device)
    if rows == 0 or H == 0:
        return out
    index = src_index.contiguous()
    _permute_kernel[lambda meta: (min(budget, rows),)](
        x, index, out, rows, H, x.stride(0), out.stride(0), budget)
    return out


def moe_unpermute(y: torch.Tensor, combine_index: torch.Tensor,
                  weights: Optional[torch.Tensor] = None, *, num_sms: Optional[int] = None,
                  out_dtype: Optional[torch.dtype] = None,
                  check_bounds: Optional[bool] = None) -> torch.Tensor:
    """Weighted sum of each token's expert outputs: ``out[t] = sum_j w[t,j] * y[idx[t,j]]``.

    Args:
        y: ``[R, H]`` expert outputs in permuted order, float32/bfloat16/float16, unit
            stride along ``H``.
        combine_index: ``[T, k]`` int32/int64 rows of ``y`` (``-1`` = dropped, skipped),
            from :func:`moe_dispatch_index`.
        weights: optional ``[T, k]`` gate weights (any float dtype; used in float32);
            ``None`` sums unweighted.
        num_sms: SM budget = maximum grid size; ``None`` = all SMs (1 program on CPU).
        out_dtype: result dtype (default ``y.dtype``); accumulation is float32.
        check_bounds: validate ``combine_index`` < R (``IndexError``); ``None`` = on CPU only.
    Returns:
        ``[T, H]`` tensor.
    """
    tensors = (y, combine_index) + (() if weights is None else (weights,))
    device = check_launchable("moe_unpermute", *tensors)
    _rows_2d("y", y)
    if y.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"y must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {y.dtype}")
    if combine_index.dim() != 2 or combine_index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"combine_index must be a 2-D [tokens, top_k] int32/int64 tensor, got "
                         f"{combine_index.dtype} {tuple(combine_index.shape)}")
    tokens, topk = combine_index.shape
    if weights is not None:
        if weights.shape != combine_index.shape or not weights.is_floating_point():
            raise ValueError(f"weights must be a float tensor shaped like combine_index "
                             f"{tuple(combine_index.shape)}, got {weights.dtype} {tuple(weights.shape)}")
        weights = weights.contiguous()
    out_dtype = y.dtype if out_dtype is None else out_dtype
    if out_dtype not in _FLOAT_DTYPES:
        raise TypeError(f"out_dtype must be one of {[str(d) for d in _FLOAT_DTYPES]}, got {out_dtype}")
    budget = sm_budget(num_sms, device)
    if (check_bounds if check_bounds is not None else device.type == "cpu") and combine_index.numel():
        high = int(combine_index.max())
        if high >= y.shape[0]:
            raise IndexError(f"combine_index values must be < {y.shape[0]} (rows of y), got {high}")
    H = y.shape[1]
    out = torch.empty((tokens, H), dtype=out_dtype, device=device)
    if tokens == 0 or H == 0:
        return out
    if topk == 0:
        return out.zero_()
    index = combine_index.contiguous()
    _unpermute_kernel[lambda meta: (min(budget, tokens),)](
        y, index, index if weights is None else weights, out, tokens, H, y.stride(0),
        out.stride(0), budget, TOPK=topk, HAS_WEIGHTS=weights is not None)
    return out


def moe_dispatch_index(topk_ids: torch.Tensor, num_experts: int
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tensors for :func:`moe_permute` / :func:`moe_unpermute` (pure torch).

    Args:
        topk_ids: ``[T, k]`` int expert id of each token's ``j``-th choice, in
            ``[0, num_experts)``.
        num_experts: ``E``.
    Returns:
        ``(src_index [T*k] int64, combine_index [T, k] int64, tokens_per_expert [E] int64)``:
        ``src_index`` lists token ids grouped by expert (stable: token order within an
        expert); ``combine_index[t, j]`` is the row of the permuted buffer holding
        token ``t``'s copy for its ``j``-th expert; expert ``e`` owns rows
        ``[cumsum[e-1], cumsum[e])`` of ``tokens_per_expert``.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64, torch.int16, torch.uint8):
        raise ValueError(f"topk_ids must be a 2-D integer tensor [tokens, top_k], got "
                         f"{topk_ids.dtype} {tuple(topk_ids.shape)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    tokens, topk = topk_ids.shape
    flat = topk_ids.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= num_experts):
        raise IndexError(f"topk_ids values must be in [0, {num_experts})")
    order = torch.sort(flat, stable=True).indices           # flat (t, j) slots by expert
    src_index = torch.div(order, topk, rounding_mode="floor") if topk else order
    combine = torch.empty_like(order)
    combine[order] = torch.arange(order.numel(), device=order.device)
    counts = torch.bincount(flat, minlength=num_experts)
    return src_index, combine.view(tokens, topk), counts
