"""Triton kernel for the sparse decode: out[n] = sum_k values[n, k] W_O[indices[n, k]] (docs/method.md §1).

One program per (token, block of d columns) loads the token's K head indices and values in blocks of
`BLOCK_K`, gathers the matching [BLOCK_K, BLOCK_D] tile of W_O rows and accumulates in float32: only K rows
of W_O are read per token. Importing this module requires Triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_decode_kernel(
    values_ptr,
    indices_ptr,
    weight_ptr,
    out_ptr,
    top_k,
    d,
    weight_row_stride,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    column_mask = columns < d
    accumulator = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, top_k, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        k_mask = ks < top_k
        heads = tl.load(indices_ptr + token * top_k + ks, mask=k_mask, other=0).to(tl.int64)
        values = tl.load(values_ptr + token * top_k + ks, mask=k_mask, other=0.0).to(tl.float32)
        rows = tl.load(
            weight_ptr + heads[:, None] * weight_row_stride + columns[None, :],
            mask=k_mask[:, None] & column_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        accumulator += tl.sum(rows * values[:, None], axis=0)
    tl.store(out_ptr + token * d + columns, accumulator.to(out_ptr.dtype.element_ty), mask=column_mask)


def triton_sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """values, indices [N, K], W_O [n_ov, d] -> [N, d] in W_O's dtype, accumulated in float32."""
    num_tokens, top_k = indices.shape
    d = W_O.shape[1]
    values, indices = values.contiguous(), indices.contiguous()
    if W_O.stride(1) != 1:
        W_O = W_O.contiguous()
    output = torch.empty(num_tokens, d, dtype=W_O.dtype, device=W_O.device)
    if num_tokens == 0:
        return output
    block_d = min(256, triton.next_power_of_2(d))
    block_k = min(32, triton.next_power_of_2(top_k))
    grid = (num_tokens, triton.cdiv(d, block_d))
    _sparse_decode_kernel[grid](
        values, indices, W_O, output, top_k, d, W_O.stride(0), BLOCK_K=block_k, BLOCK_D=block_d
    )
    return output
