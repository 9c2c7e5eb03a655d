"""Triton kernels that take an SM budget (installed as ``overlap.kernels``).

* :func:`persistent_matmul` -- ``a @ b`` on at most ``num_sms`` SMs (compute side);
* :func:`moe_permute` / :func:`moe_unpermute` / :func:`moe_dispatch_index` -- MoE token
  dispatch/combine reordering on at most ``num_sms`` SMs.

Importing never fails and never touches a GPU: without triton (>= 3.0) the functions
raise :class:`TritonUnavailableError` when called. On CPU they run under the Triton
interpreter (``TRITON_INTERPRET=1``), which is how the tests check them.
"""
from ._triton_support import HAS_TRITON, TRITON_ERROR, TritonUnavailableError, interpreting
from .moe_permute import moe_dispatch_index, moe_permute, moe_unpermute
from .persistent_matmul import persistent_matmul

__all__ = [
    "HAS_TRITON",
    "TRITON_ERROR",
    "TritonUnavailableError",
    "interpreting",
    "persistent_matmul",
    "moe_permute",
    "moe_unpermute",
    "moe_dispatch_index",
]
