"""The two backward routes of the fast attention node (`lorsa_hf.ops.attention`): through the values v, or,
when the node projected v itself, through the layer input x (softmax rows sum to one).

Both go block by block (`lorsa_hf.ops.blocks`), recompute each block's pattern and use that a softmax row's
gradient is P * (dP - sum(dP * P)), in place; gradient reaches z only at the kept entries (plus z's own
gradient, densely, when z was used).
"""

from __future__ import annotations

import torch

from .blocks import block_pattern, one_sequence_mask
from .decode import bag_sum

# backward from v takes as many heads at a time as keep a block's temporaries ([heads, rows, max(end, g)]) near
# this (from x, all heads at once: its per-block temporaries [n_qk, rows, d] are those of the larger matmuls)
BACKWARD_CHUNK_ELEMENTS = 2**17


def _write_or_add_product(
    target: torch.Tensor, end: int, left: torch.Tensor, right: torch.Tensor, first: bool, scale: float = 1.0
) -> None:
    """target[:, :end] = scale * left @ right, zeros after `end` (first block), or += (later blocks): dk and dv
    [H, S, *] are accumulated over blocks of query rows in place, without a zero fill or a temporary product
    when the first block covers every key."""
    if first and end == target.shape[1] and target.is_contiguous():
        torch.matmul(left, right, out=target)
        if scale != 1.0:
            target.mul_(scale)
        return
    if not first:
        target[:, :end].baddbmm_(left, right, alpha=scale)
        return
    target[:, :end] = torch.matmul(left, right).mul_(scale)
    target[:, end:] = 0.0


def backward_through_values(
    ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    indices: torch.Tensor, grad_z: torch.Tensor | None, grad_values: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv of `_BlockedSparseAttention` given v: dz (the kept activations' gradient at their heads, plus
    z's own when z was used) is scattered into a block of a few heads at a time, dP = dz v^T, dv = P^T dz."""
    batch_size, heads, query_length, _ = query.shape
    group_size, blocks = value.shape[-1], ctx.blocks
    # dv in v's own [B, H, S, g] order, whatever v's memory layout: each chunk's first product lands in place
    grad_query, grad_key = torch.empty_like(query), torch.empty_like(key)
    grad_value = torch.empty(value.shape, dtype=value.dtype, device=value.device)
    # a few heads at a time, so that a block's temporaries stay small next to dq, dk and dv
    chunks = [
        min(heads, max(1, BACKWARD_CHUNK_ELEMENTS // ((stop - start) * max(end, group_size))))
        for start, stop, end, _ in blocks
    ]
    # dz of one chunk of heads for one block; without z's own gradient it holds zeros between uses
    buffer = (torch.empty if grad_z is not None else torch.zeros)(
        max((stop - start) * chunk for (start, stop, _, _), chunk in zip(blocks, chunks, strict=True)) * group_size,
        dtype=value.dtype, device=value.device,
    )
    for b in range(batch_size):
        sequence_mask = one_sequence_mask(mask, b)
        # the block that sees the most keys first: it writes dk and dv, the others add to them
        for number in reversed(range(len(blocks))):
            start, stop, end, _ = block = blocks[number]
            first, tokens = number == len(blocks) - 1, slice(b * query_length + start, b * query_length + stop)
            width = chunks[number] * group_size  # dz columns of one chunk of heads
            if grad_values is not None:  # each kept activation's chunk and column within it
                chunk_of, column = indices[tokens].div(width, rounding_mode="floor"), indices[tokens] % width
                kept_gradient = grad_values[tokens].to(value.dtype)
            for number_in_block, h in enumerate(range(0, heads, chunks[number])):
                group = slice(h, min(h + chunks[number], heads))
                q, k, v = query[b, group], key[b, group], value[b, group]
                # dz [h, rows, g]: the kept activations' gradient at their heads, plus z's own when z was used
                grad_rows = buffer[: (stop - start) * width].view(stop - start, width)
                columns = slice(h * group_size, group.stop * group_size)
                if grad_z is not None:
                    grad_rows[:, : columns.stop - columns.start] = grad_z[tokens, columns]
                if grad_values is not None:
                    grad_rows.scatter_add_(-1, column, torch.where(chunk_of == number_in_block, kept_gradient, 0.0))
                grad_block = grad_rows[:, : columns.stop - columns.start].view(stop - start, -1, group_size)
                grad_block = grad_block.transpose(0, 1)

                pattern = block_pattern(q, k, sequence_mask, block, ctx.scale, ctx.empty_rows)
                grad_logits = torch.matmul(grad_block, v[:, :end].transpose(-1, -2))  # dP [h, rows, end]
                _softmax_backward_(grad_logits, pattern)
                _write_or_add_product(grad_value[b, group], end, pattern.transpose(-1, -2), grad_block, first)
                del pattern
                _query_key_gradients(
                    grad_query[b, group], grad_key[b, group], grad_logits, q, k, block, first, ctx.scale
                )
                if grad_z is None and grad_values is not None:
                    grad_rows.scatter_(-1, column, 0.0)  # zeros again where this use wrote, K per token
    return grad_query, grad_key, grad_value


def _softmax_backward_(grad_pattern: torch.Tensor, pattern: torch.Tensor) -> None:
    """dP -> d(logits) in place: P * (dP - sum(dP * P)) per row."""
    grad_pattern.mul_(pattern)
    grad_pattern.addcmul_(pattern, grad_pattern.sum(-1, keepdim=True), value=-1.0)


def _query_key_gradients(
    grad_query: torch.Tensor, grad_key: torch.Tensor, grad_logits: torch.Tensor, query: torch.Tensor,
    key: torch.Tensor, block: tuple[int, int, int, int], first: bool, scale: float,
) -> None:
    """One block's dq rows and its share of dk from d(logits) [h, rows, end]: q and k [h, T or S, d_qk]."""
    start, stop, end, _ = block
    grad_query[:, start:stop] = torch.matmul(grad_logits, key[:, :end]).mul_(scale)
    _write_or_add_product(grad_key, end, grad_logits.transpose(-1, -2), query[:, start:stop], first, scale)


def backward_through_inputs(
    ctx, query: torch.Tensor, key: torch.Tensor, hidden_states: torch.Tensor, W_V: torch.Tensor,
    mask: torch.Tensor | None, indices: torch.Tensor, grad_z: torch.Tensor | None, grad_values: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dq, dk, dx, dW_V, db_V of `_BlockedSparseAttention` when it projected v itself, through x rather than v
    (`backward_from_inputs`), all heads of a block at once, in two passes over the blocks:

    1. mixed = P x of each group at every token, from which W_V's gradient follows at the kept heads only
       (`_value_weight_gradient`); mixed is freed before the second pass allocates dq and dk. Skipped when W_V
       needs no gradient (attribution to the input through a frozen Lorsa).
    2. u = dz W_V per group (the W_V rows of the kept heads weighted by their gradient, plus z's own gradient
       when z was used), dP = u x^T (exact up to a constant per row, which the softmax backward cancels), and
       x's gradient P^T u when x needs one."""
    batch_size, heads, query_length, _ = query.shape
    group_size, blocks, dtype = ctx.group_size, ctx.blocks, query.dtype
    top_k = indices.shape[-1]
    x = hidden_states.to(dtype)
    d = x.shape[-1]
    grad_W_V = grad_b_V = None
    if ctx.needs_input_grad[4]:
        mixed = torch.empty(heads, batch_size, query_length, d, dtype=W_V.dtype, device=x.device)
        for b in range(batch_size):
            sequence_mask = one_sequence_mask(mask, b)
            for block in blocks:
                start, stop, end, _ = block
                pattern = block_pattern(query[b], key[b], sequence_mask, block, ctx.scale, ctx.empty_rows)
                mixed[:, b, start:stop] = torch.matmul(pattern, x[b, :end])
        grad_W_V = _value_weight_gradient(mixed, grad_z, grad_values, indices, group_size)
        del mixed, pattern
    if ctx.needs_input_grad[5]:
        grad_b_V = _value_bias_gradient(ctx, grad_z, grad_values, indices, mask, batch_size, heads * group_size)

    grad_query, grad_key = torch.empty_like(query), torch.empty_like(key)
    grad_x = torch.zeros_like(x) if ctx.needs_input_grad[3] else None
    grouped_W_V = W_V.view(heads, group_size, d)
    for b in range(batch_size):
        sequence_mask = one_sequence_mask(mask, b)
        # the block that sees the most keys first: it writes dk, the others add to it
        for number in reversed(range(len(blocks))):
            start, stop, end, _ = block = blocks[number]
            first, tokens = number == len(blocks) - 1, slice(b * query_length + start, b * query_length + stop)
            rows = stop - start
            if grad_values is not None:  # u [H, rows, d]: per group, the W_V rows of its kept heads times their dz
                heads_kept = indices[tokens].reshape(-1)
                row = torch.arange(rows, device=x.device).repeat_interleave(top_k)
                bags = (heads_kept // group_size) * rows + row
                grad_sums = bag_sum(W_V, heads_kept, bags, grad_values[tokens].reshape(-1), heads * rows)
            else:
                grad_sums = torch.zeros(heads * rows, d, dtype=W_V.dtype, device=x.device)
            grad_sums = grad_sums.view(heads, rows, d)
            if grad_z is not None:
                grad_block = grad_z[tokens].view(rows, heads, group_size).transpose(0, 1).to(W_V.dtype)
                grad_sums.baddbmm_(grad_block, grouped_W_V)
            grad_sums = grad_sums.to(dtype)

            pattern = block_pattern(query[b], key[b], sequence_mask, block, ctx.scale, ctx.empty_rows)
            if grad_x is not None:
                grad_x[b, :end].addmm_(pattern.reshape(-1, end).T, grad_sums.reshape(-1, d))
            grad_logits = torch.matmul(grad_sums, x[b, :end].T)  # dP [H, rows, end], up to a constant per row
            _softmax_backward_(grad_logits, pattern)
            del pattern
            _query_key_gradients(grad_query[b], grad_key[b], grad_logits, query[b], key[b], block, first, ctx.scale)
    if grad_x is not None:
        grad_x = grad_x.to(hidden_states.dtype)
    return grad_query, grad_key, grad_x, grad_W_V, grad_b_V


def _value_weight_gradient(
    mixed: torch.Tensor, grad_z: torch.Tensor | None, grad_values: torch.Tensor | None, indices: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """dW_V [n_ov, d] of `_BlockedSparseAttention`'s backward through x: z_i[t] = mixed_h(i)[t] . W_V[i] + ..., where
    mixed [H, B, T, d] holds P x of each group. Row i sums dz[t, i] mixed_h(i)[t] over the tokens that kept head i
    (plus z's own gradient, densely, when z was used)."""
    heads, d = mixed.shape[0], mixed.shape[-1]
    num_tokens, top_k = indices.shape
    n_ov = heads * group_size
    if grad_values is not None:
        heads_kept = indices.reshape(-1)
        tokens = torch.arange(num_tokens, device=mixed.device).repeat_interleave(top_k)
        entries = (heads_kept // group_size) * num_tokens + tokens
        grad_W_V = bag_sum(mixed.view(-1, d), entries, heads_kept, grad_values.reshape(-1), n_ov)
    else:
        grad_W_V = torch.zeros(n_ov, d, dtype=mixed.dtype, device=mixed.device)
    if grad_z is not None:
        grad_z_by_group = grad_z.view(num_tokens, heads, group_size).permute(1, 2, 0).to(mixed.dtype)
        grad_W_V += torch.bmm(grad_z_by_group, mixed.view(heads, num_tokens, d)).view(n_ov, d)
    return grad_W_V


def _value_bias_gradient(
    ctx, grad_z: torch.Tensor | None, grad_values: torch.Tensor | None, indices: torch.Tensor,
    mask: torch.Tensor | None, batch_size: int, n_ov: int,
) -> torch.Tensor:
    """db_V [n_ov] of `_BlockedSparseAttention`'s backward through x: z_i[t] = ... + b_V[i] rowsum(P[t]), and a
    softmax row sums to one, or to zero for a query row that sees no key."""
    num_tokens = indices.shape[0]
    seen = torch.ones(num_tokens, dtype=torch.float32, device=indices.device)
    if ctx.empty_rows:
        seen = mask.any(-1).expand(batch_size, 1, num_tokens // batch_size).reshape(-1).to(seen.dtype)
    dtype = torch.promote_types(ctx.b_V_dtype, torch.float32)
    grad_b_V = torch.zeros(n_ov, dtype=dtype, device=indices.device)
    if grad_values is not None:
        grad_b_V.index_add_(0, indices.reshape(-1), (grad_values.to(dtype) * seen[:, None]).reshape(-1))
    if grad_z is not None:
        grad_b_V += (grad_z.to(dtype) * seen[:, None]).sum(0)
    return grad_b_V.to(ctx.b_V_dtype)
