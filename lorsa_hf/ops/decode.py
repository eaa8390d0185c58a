"""The sparse decode: each token's output is the sum of its K kept activations times their rows of W_O.

`sparse_top_k_decode` is the autograd node the fast path uses: forward and backward read only the K selected
rows of W_O per token (`embedding_bag` with per-sample weights, or a Triton kernel on CUDA).
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def bag_sum(
    table: torch.Tensor, entries: torch.Tensor, bags: torch.Tensor, weights: torch.Tensor, num_bags: int
) -> torch.Tensor:
    """out[b] = sum of weights[e] table[entries[e]] over the entries e with bags[e] == b: [num_bags, table width],
    zeros for empty bags. An `embedding_bag` once the entries are sorted by bag (a stable integer sort: a radix
    sort on CPU, much faster than sorting the same keys as floats)."""
    order = torch.argsort(bags, stable=True)
    counts = torch.bincount(bags, minlength=num_bags)
    return F.embedding_bag(
        entries[order], table, counts.cumsum(0) - counts, per_sample_weights=weights[order].to(table.dtype), mode="sum"
    )


@functools.cache
def load_triton_decode() -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """The Triton decode kernel (`lorsa_hf.ops.triton_decode`), imported the first time a CUDA tensor reaches the
    decode; None when Triton is not installed, cannot be imported, or `LORSA_HF_DISABLE_TRITON=1` is set, and
    the decode then falls back to `embedding_bag`."""
    if os.environ.get("LORSA_HF_DISABLE_TRITON", "0") == "1":
        return None
    try:
        from .triton_decode import triton_sparse_decode
    except ImportError:
        return None
    return triton_sparse_decode


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """sum_k values[n, k] W_O[indices[n, k]]: [N, K] x2 -> [N, d], reading only the selected rows of W_O.

    On CUDA a Triton kernel when Triton is installed, otherwise `embedding_bag` with per-sample weights.
    """
    values = values.to(W_O.dtype)
    if W_O.is_cuda:
        triton_sparse_decode = load_triton_decode()
        if triton_sparse_decode is not None:
            return triton_sparse_decode(values, indices, W_O)
    return F.embedding_bag(indices, W_O, per_sample_weights=values, mode="sum")


def _selected_rows_dot(grad_output: torch.Tensor, W_O: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """grad_output[n] . W_O[indices[n, k]] -> [N, K]: the dense grad_output @ W_O^T sampled at the selection only
    (a sampled dense-dense matmul on a CSR pattern; float32 for dtypes it lacks)."""
    num_tokens, top_k = indices.shape
    compute_dtype = grad_output.dtype if grad_output.dtype in (torch.float32, torch.float64) else torch.float32
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(
            torch.arange(0, num_tokens * top_k + 1, top_k, device=indices.device),
            indices.reshape(-1),
            torch.ones(num_tokens * top_k, dtype=compute_dtype, device=indices.device),
            (num_tokens, W_O.shape[0]),
            check_invariants=False,
        )
    sampled = torch.sparse.sampled_addmm(pattern, grad_output.to(compute_dtype), W_O.to(compute_dtype).T, beta=0.0)
    return sampled.values().view(num_tokens, top_k)


def _selected_rows_gradient(
    grad_output: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, n_ov: int
) -> torch.Tensor:
    """dL/dW_O [n_ov, d], nonzero only in selected rows: row i sums values[n, k] grad_output[n] over the (n, k)
    that selected head i, one bag per head over the token rows."""
    num_tokens, top_k = indices.shape
    tokens = torch.arange(num_tokens, device=indices.device).repeat_interleave(top_k)
    return bag_sum(grad_output, tokens, indices.reshape(-1), values.reshape(-1), n_ov)


class _SparseTopKDecode(torch.autograd.Function):
    """The decode of the kept activations as an autograd node: values [N, K], indices [N, K], W_O [n_ov, d] ->
    [N, d]. Gradient reaches the kept values (a sampled dot product with W_O) and W_O only in the selected rows.
    Saved for backward: the [N, K] indices and values, and W_O."""

    @staticmethod
    def forward(ctx, values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor):
        ctx.save_for_backward(values, indices, W_O)
        return sparse_decode(values, indices, W_O)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        values, indices, W_O = ctx.saved_tensors
        grad_values = grad_W_O = None
        if ctx.needs_input_grad[0]:
            grad_values = _selected_rows_dot(grad_output, W_O, indices).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W_O = _selected_rows_gradient(grad_output.to(W_O.dtype), values, indices, W_O.shape[0])
        return grad_values, None, grad_W_O


def sparse_top_k_decode(values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """The fast decode: values, indices [N, K] -> [N, d] without b_O, reading only the K selected rows of W_O per
    token, forward and backward."""
    return _SparseTopKDecode.apply(values, indices, W_O)
