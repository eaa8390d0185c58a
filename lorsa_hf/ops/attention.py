"""The fast attention of every QK group with the TopK selection in the same autograd node (docs/method.md §1b).

`sparse_attention_top_k` (over given values v) and `sparse_projected_attention_top_k` (over the layer input x,
projecting v itself where its backward is then cheaper) compute what `lorsa_hf.ops.reference` does, skipping
the work a causal mask makes void and keeping the gradient sparse: the attention runs in blocks of query rows
(`lorsa_hf.ops.blocks`), each block's TopK is selected as soon as its z is known, and the backward
(`lorsa_hf.ops.attention_backward`) sends gradient to z only at the kept entries and keeps no softmax pattern
and nothing of size N x n_ov. `backward_from_inputs` is the cost model that picks the backward route.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .attention_backward import backward_through_inputs, backward_through_values
from .blocks import block_pattern, one_sequence_mask, query_blocks
from .masks import boolean_attention_mask, group_attention
from .projection import autocast_dtype, project_values
from .selection import decoder_norms, kept_activations, select_from_groups, select_top_k

# what a number of a row gathered and added by `embedding_bag` costs, in multiply-adds of a large matmul: 8 as
# measured on 2 CPU cores; elsewhere not measured (no GPU was at hand): gathers are bandwidth-bound while a GPU's
# matmuls run on tensor cores, so a conservative 64 keeps the backward through v unless g is far larger than d
GATHER_COST = {"cpu": 8}
GATHER_COST_UNMEASURED = 64
# whether the backward of values projected in the attention node goes through x; None: the cheaper (by FLOPs)
BACKWARD_FROM_INPUTS: bool | None = None


def backward_from_inputs(
    blocks: list[tuple[int, int, int, int]], query_length: int, group_size: int, d: int, heads: int, top_k: int,
    input_gradient: bool, device_type: str = "cpu",
) -> bool:
    """Whether the backward of attention over values projected in the node is cheaper from x than from v, in
    multiply-adds per token and QK group (S: the keys a query row sees, on average over the blocks):

    - from v: dP = dz v^T and dv = P^T dz (2 S g), then dW_V = dv^T x and, for x's gradient, dx = dv W_V (g d each);
    - from x (softmax rows sum to one, as in `input_form_attention`): u = dz W_V over the kept heads only, then
      dP = u x^T and P x, from which dW_V's kept rows follow (2 S d), and dx = P^T u (S d); the two gathers of
      K rows of d numbers per token (u, dW_V) are counted at the device's `GATHER_COST` each.

    From x wins where g is large next to S and d and K is small: at SmolLM2-135M size (g 512, d 576, S 160, K 64)
    1.8x fewer, at Llama-3.1-8B size and 64 tokens 6.6x; at Pythia-160M size (g 128, d 768) and at SmolLM2 size
    with K 512 (the start of K annealing) from v is cheaper. From x also keeps x instead of v for backward.
    `BACKWARD_FROM_INPUTS` overrides the choice (tests run both)."""
    if BACKWARD_FROM_INPUTS is not None:
        return BACKWARD_FROM_INPUTS
    keys = sum((stop - start) * end for start, stop, end, _ in blocks) / query_length
    from_values = 2 * keys * group_size + group_size * d * (1 + input_gradient)
    gather_cost = GATHER_COST.get(device_type, GATHER_COST_UNMEASURED)
    from_inputs = keys * d * (2 + input_gradient) + 2 * gather_cost * top_k * d / heads
    return from_inputs < from_values


class _BlockedSparseAttention(torch.autograd.Function):
    """Attention of every QK group and the TopK selection as one node, so that the gradient stays sparse:
    q [B, H, T, d_qk], k [B, H, S, d_qk] and either v [B, H, S, g] or the x [B, S, d], W_V [n_ov, d] and b_V [n_ov]
    that project it -> z [N, n_ov] (head i = group * g + j), the kept activations [N, K] and their heads [N, K].

    Forward runs blocks of query rows against only the keys their mask lets them see (`query_blocks`) and
    selects each block's TopK as soon as its z is known. Kept for backward: q, k, the [N, K] selection and v, or
    x instead of v when the node projected it (`sparse_projected_attention_top_k` hands it x, W_V and b_V where the
    backward is cheaper through x: `backward_from_inputs`); no [T, S] pattern and nothing of size N x n_ov.
    Backward goes block by block, recomputes each block's pattern and uses that a softmax row's gradient is
    P * (dP - sum(dP * P)), in place; dP and the way to v's weights come from v
    (`backward_through_values`) or from x (`backward_through_inputs`). Query rows that
    may see no key at all (padding) give zeros, as `group_attention` does."""

    @staticmethod
    def forward(
        ctx, query, key, value, hidden_states, W_V, b_V, mask, blocks, scale: float, norms, top_k: int, activation: str
    ):
        batch_size, heads, query_length, _ = query.shape
        from_inputs = value is None
        if from_inputs:
            dtype = query.dtype
            value = project_values(hidden_states.to(dtype), W_V.to(dtype), b_V.to(dtype), heads)
        group_size = value.shape[-1]
        n_ov = heads * group_size
        empty_rows = mask is not None and not bool(mask.any(-1).all())
        if value.dtype not in (torch.float32, torch.float64):
            value = value.contiguous()  # bf16/fp16 matmuls copy v^T unless it is a plain transposed matrix
        z = torch.empty(batch_size, query_length, heads, group_size, dtype=value.dtype, device=value.device)
        values = torch.empty(batch_size, query_length, top_k, dtype=value.dtype, device=value.device)
        indices = torch.empty(batch_size, query_length, top_k, dtype=torch.long, device=value.device)
        for b in range(batch_size):
            sequence_mask = one_sequence_mask(mask, b)
            for block in blocks:
                start, stop, end, _ = block
                pattern = block_pattern(query[b], key[b], sequence_mask, block, scale, empty_rows)
                z[b, start:stop] = torch.matmul(pattern, value[b, :, :end]).transpose(0, 1)  # [rows, H, g]
                z_rows = z[b, start:stop].view(stop - start, n_ov)
                indices[b, start:stop] = select_top_k(z_rows, norms, top_k, activation)
                values[b, start:stop] = kept_activations(z_rows, indices[b, start:stop], activation)
        if any(ctx.needs_input_grad[:6]):
            ctx.save_for_backward(query, key, None if from_inputs else value, hidden_states, W_V, mask, values, indices)
        ctx.blocks, ctx.scale, ctx.empty_rows, ctx.relu = blocks, scale, empty_rows, activation == "topk_relu"
        ctx.group_size, ctx.b_V_dtype = group_size, None if b_V is None else b_V.dtype
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return z.view(-1, n_ov), values.view(-1, top_k), indices.view(-1, top_k)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z: torch.Tensor | None, grad_values: torch.Tensor | None, grad_indices: None):
        query, key, value, hidden_states, W_V, mask, values, indices = ctx.saved_tensors
        top_k = indices.shape[-1]
        values, indices = values.view(-1, top_k), indices.view(-1, top_k)
        if grad_values is not None and ctx.relu:
            grad_values = grad_values * (values > 0)
        # gradients of (query, key, value, hidden_states, W_V, b_V); none for the mask and the settings after it
        if value is None:
            grad_query, grad_key, *projection = backward_through_inputs(
                ctx, query, key, hidden_states, W_V, mask, indices, grad_z, grad_values
            )
            return grad_query, grad_key, None, *projection, *[None] * 7
        gradients = backward_through_values(ctx, query, key, value, mask, indices, grad_z, grad_values)
        return *gradients, *[None] * 10


def _unblocked_attention(
    query: torch.Tensor, key: torch.Tensor, values: Callable[[], torch.Tensor], group_size: int,
    attention_mask: object, scale: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The boolean mask [B or 1, 1, T, S] (None: causal or all keys) and, where the blocked node is not the
    kernel for this shape, z per QK group [B, n_qk, T, g] from another kernel (None otherwise); `values()`
    gives v [B, n_qk, S, g] to a kernel that needs it.

    PyTorch's fused (flash) attention takes long keys. It wants value width == d_qk, so the g values of a group
    are split into g / d_qk chunks, one kernel call each with the group's own q and k. It skips masked blocks
    and keeps no [T, S] pattern, but recomputes the q.k logits per chunk, and on CPU runs well below the matmul
    rate (docs/performance.md), so it runs for at most two chunks and keys longer than 2 g. A per-head mask
    (none of the forms `boolean_attention_mask` produces) takes `group_attention`."""
    batch_size, _, query_length, d_qk = query.shape
    key_length = key.shape[-2]
    flash = group_size % d_qk == 0 and group_size // d_qk <= 2 and key_length > 2 * group_size
    causal = attention_mask is None and query_length == key_length
    mask = None
    if not (flash and causal):  # the flash kernel's own causal flag needs no mask
        mask = boolean_attention_mask(attention_mask, batch_size, query_length, key_length, query.device)
    if flash:
        z = torch.cat([
            F.scaled_dot_product_attention(query, key, chunk, attn_mask=mask, is_causal=causal, scale=scale)
            for chunk in values().split(d_qk, dim=-1)  # [B, n_qk, S, d_qk] views of v
        ], dim=-1)
        return mask, z
    if mask is not None and mask.shape[1] != 1:
        return mask, group_attention(query, key, values(), mask, scale)
    return mask, None


def _blocked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None,
    projection: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, mask: torch.Tensor | None,
    blocks: list[tuple[int, int, int, int]], scale: float, norms: torch.Tensor, top_k: int, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_BlockedSparseAttention` over v, or over the (x, W_V, b_V) that project it inside the node, with q, k and
    v in one dtype, as autocast would give the matmuls (q and k leave the rotary in float32)."""
    device_type = query.device.type
    value_dtype = projection[1].dtype if value is None else value.dtype
    dtype = autocast_dtype(device_type, torch.promote_types(torch.promote_types(query.dtype, key.dtype), value_dtype))
    with torch.autocast(device_type, enabled=False):
        query, key = query.to(dtype), key.to(dtype)
        value = None if value is None else value.to(dtype)
        return _BlockedSparseAttention.apply(
            query, key, value, *(projection or (None, None, None)), mask, blocks, scale, norms, top_k, activation
        )


def sparse_attention_top_k(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, scale: float,
    W_O: torch.Tensor, top_k: int, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dense_attention_top_k` (q [B, n_qk, T, d_qk], k [B, n_qk, S, d_qk], v [B, n_qk, S, g] -> z [N, n_ov], the
    kept activations [N, K] and their heads [N, K]), skipping the work a causal mask makes void and keeping the
    gradient sparse.

    Long keys take PyTorch's fused attention (`_unblocked_attention`); otherwise `_BlockedSparseAttention`:
    batched matmuls over blocks of query rows, each against the keys its mask lets it see (62.5% of the T x S
    work at T = 256 under a causal mask), with the selection in the same node.
    """
    norms = decoder_norms(W_O)
    mask, z = _unblocked_attention(query, key, lambda: value, value.shape[-1], attention_mask, scale)
    if z is not None:
        return select_from_groups(z, norms, top_k, activation)
    blocks = query_blocks(mask, query.shape[-2], key.shape[-2])
    return _blocked_attention(query, key, value, None, mask, blocks, scale, norms, top_k, activation)


def sparse_projected_attention_top_k(
    query: torch.Tensor, key: torch.Tensor, hidden_states: torch.Tensor, W_V: torch.Tensor, b_V: torch.Tensor,
    attention_mask: object, scale: float, W_O: torch.Tensor, top_k: int, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sparse_attention_top_k` over the values v = x W_V^T + b_V of the keys' own tokens x [B, S, d].

    Where the backward is then cheaper through x (`backward_from_inputs`), the node projects v itself, keeps x
    instead of v, and its backward reaches W_V through x at the kept heads only; otherwise v is projected first.
    """
    n_qk, query_length = query.shape[1], query.shape[-2]
    group_size = W_V.shape[0] // n_qk
    norms = decoder_norms(W_O)

    def values() -> torch.Tensor:
        return project_values(hidden_states, W_V, b_V, n_qk)

    mask, z = _unblocked_attention(query, key, values, group_size, attention_mask, scale)
    if z is not None:
        return select_from_groups(z, norms, top_k, activation)
    blocks = query_blocks(mask, query_length, key.shape[-2])
    input_gradient = torch.is_grad_enabled() and hidden_states.requires_grad
    if backward_from_inputs(
        blocks, query_length, group_size, hidden_states.shape[-1], n_qk, top_k, input_gradient,
        hidden_states.device.type,
    ):
        projection = (hidden_states, W_V, b_V)
        return _blocked_attention(query, key, None, projection, mask, blocks, scale, norms, top_k, activation)
    return _blocked_attention(query, key, values(), None, mask, blocks, scale, norms, top_k, activation)
