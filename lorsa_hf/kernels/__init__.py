"""Optional GPU kernels, imported only when a CUDA tensor reaches them.

`triton_sparse_decode` is None when Triton is not installed, cannot be imported, or `LORSA_HF_DISABLE_TRITON=1`
is set; callers then fall back to `torch.nn.functional.embedding_bag`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

triton_sparse_decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None

if os.environ.get("LORSA_HF_DISABLE_TRITON", "0") != "1":
    try:
        from .triton_decode import triton_sparse_decode
    except ImportError:
        triton_sparse_decode = None

__all__ = ["triton_sparse_decode"]
