"""Persistent matmul: ``C = A @ B`` on at most ``num_sms`` SMs (the compute side of a split).

The grid is ``min(num_sms, tiles)`` programs; each program walks output tiles
``pid, pid + grid, ...`` (grouped along M for L2 reuse), so the kernel never occupies more
than its SM budget and leaves the rest to communication kernels -- the software SM split
DeepSeek-V3 used (112 of 132 SMs for GEMMs, 20 for all-to-all). Accumulation is float32.

Shapes/dtypes: ``a [M, K]``, ``b [K, N]`` (any strides), float32 / bfloat16 / float16,
both the same dtype; the result ``[M, N]`` has that dtype. float32 inputs use IEEE fp32
products unless ``torch.backends.cuda.matmul.allow_tf32`` is set (then TF32), as
``torch.matmul`` does.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from overlap import device_sm_count

from ._triton_support import check_launchable, interpreting, lazy_kernel, tl, triton

__all__ = ["persistent_matmul", "matmul_configs", "PINNED_MATMUL"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


#: Index in the compiled space of the config ``DUALPIPE_TRITON_PIN=1`` keeps: 128x128x32
#: tiles, 4 stages need 128 KiB of shared memory in float32 (64 KiB in bf16), inside
#: Hopper's 227 KiB and Ampere's 163 KiB, with one warpgroup for wgmma.
PINNED_MATMUL = 2


def matmul_configs(interpret: bool) -> List["triton.Config"]:
    """Autotune space; a single small tile under the interpreter (tl.dot needs >= 16).
    With ``DUALPIPE_TRITON_PIN`` set the kernel is tuned over ``[space[PINNED_MATMUL]]``."""
    if interpret:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2},
                              num_warps=4, num_stages=1)]
    space = [  # (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), Hopper-sized first
        (128, 256, 64, 8, 3),
        (128, 128, 64, 8, 3),
        (128, 128, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 32, 4, 4),
    ]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for bm, bn, bk, w, s in space]


@lazy_kernel(configs=matmul_configs, key=["M", "N", "K", "sm_budget"], known_good=PINNED_MATMUL)
def _persistent_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    sm_budget,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    # sm_budget only keys the autotune cache (Triton adds the tensors' dtypes to the key);
    # the persistent loop strides by the launched grid, sized min(sm_budget, tiles).
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_tiles = num_pid_m * num_pid_n
    tiles_per_group = GROUP_M * num_pid_n
    for tile in range(pid, num_tiles, programs):
        group = tile // tiles_per_group
        first_m = group * GROUP_M
        group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % tiles_per_group) % group_rows
        pid_n = (tile % tiles_per_group) // group_rows
        offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        mask_m = offs_m < M
        mask_n = offs_n < N
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < K
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                        mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # the interpreter has no bf16/fp16 arithmetic
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn,
                 acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def persistent_matmul(a: torch.Tensor, b: torch.Tensor, *, num_sms: Optional[int] = None,
                      out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a @ b`` with a persistent grid of at most ``num_sms`` programs.

    Args:
        a: ``[M, K]`` float32/bfloat16/float16.
        b: ``[K, N]``, same dtype and device as ``a``.
        num_sms: SM budget (e.g. ``SMPartition.compute_sms``); ``None`` = all SMs of the
            device (1 program on CPU under the interpreter).
        out: optional ``[M, N]`` output of the same dtype (any strides).
    Returns:
        ``[M, N]`` tensor (``out`` if given).
    """
    device = check_launchable("persistent_matmul", a, b, *(() if out is None else (out,)))
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"persistent_matmul needs a [M, K] and b [K, N], got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    if a.dtype not in _DTYPES or b.dtype != a.dtype:
        raise TypeError(f"persistent_matmul supports {[str(d) for d in _DTYPES]} with a and b "
                        f"of one dtype, got {a.dtype} and {b.dtype}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        out = torch.empty((M, N), dtype=a.dtype, device=device)
    elif out.shape != (M, N) or out.dtype != a.dtype:
        raise ValueError(f"out must be [{M}, {N}] {a.dtype}, got {tuple(out.shape)} {out.dtype}")
    if num_sms is None:
        num_sms = device_sm_count(device)
    if isinstance(num_sms, bool) or not isinstance(num_sms, int) or num_sms < 1:
        raise ValueError(f"num_sms must be a positive int (the SM budget), got {num_sms!r}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    interpret = interpreting()
    if interpret or (a.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32):
        precision = "ieee"
    elif a.dtype == torch.float32:
        precision = "tf32"
    else:
        precision = None  # 16-bit inputs: the dtype decides
    upcast = interpret and a.dtype != torch.float32

    def grid(meta):
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        return (min(num_sms, tiles),)

    _persistent_matmul_kernel[grid](
        a, b, out, M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        num_sms,
        UPCAST=upcast, INPUT_PRECISION=precision,
    )
    return out
