"""The fast Lorsa path (docs/method.md §1b) and the dense reference it is tested and benchmarked against.

Both paths compute the same function and share the TopK selection rule; they differ in how:

- dense (the formulation of the reference implementations): einsum projections, the unfused attention with its
  [T, S] pattern, the activations scattered into a [N, n_ov] tensor and decoded with a dense matmul against all
  of W_O; autograd then differentiates through every head.
- sparse: Q/K projections batched over the QK groups against the stored weights; the attention in blocks of
  query rows that skip the keys a causal mask hides, with the TopK selection in the same autograd node
  (`_BlockedSparseAttention`), so that its backward sends gradient to z only at the kept entries and keeps no
  softmax pattern and nothing of size N x n_ov; where it is cheaper (large g), the V projection in the same
  node, whose backward then reaches W_V through x at the kept heads only, without keeping v; a decode that
  reads only the K selected rows of W_O per token (`embedding_bag` with per-sample weights, or a Triton kernel
  on CUDA), whose backward reaches W_O only in those rows (`_SparseTopKDecode`).

For generation, `input_form_attention` computes z from a cache that holds the layer's input x instead of the
n_ov values per token (the softmax rows sum to one, so attending over x and projecting afterwards is exact; the
backward through x uses the same identity).
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ._attention import boolean_attention_mask, group_attention

FUSED_PROJECTION_MIN_TOKENS = 64


def _autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast gives matmuls on this device type, or `default` outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def project_values(hidden_states: torch.Tensor, W_V: torch.Tensor, b_V: torch.Tensor, n_qk: int) -> torch.Tensor:
    """v [B, n_qk, T, g] = x W_V^T + b_V, the g scalar values of each QK group's heads (head i = group * g + j)."""
    batch_size, seq_len, _ = hidden_states.shape
    return F.linear(hidden_states, W_V, b_V).view(batch_size, seq_len, n_qk, -1).transpose(1, 2)


class ValueProjection(NamedTuple):
    """The values x W_V^T + b_V of `n_qk` QK groups, not computed yet. The fast attention computes them inside its
    autograd node, whose backward may then reach W_V from x without keeping v (`_BlockedSparseAttention`);
    everything else takes `as_values(value)`."""

    hidden_states: torch.Tensor
    W_V: torch.Tensor
    b_V: torch.Tensor
    n_qk: int


def as_values(value: torch.Tensor | ValueProjection) -> torch.Tensor:
    """v [B, n_qk, T, g] from either form."""
    return project_values(*value) if isinstance(value, ValueProjection) else value


def project_queries_keys_values(
    hidden_states: torch.Tensor,
    W_Q: torch.Tensor,
    b_Q: torch.Tensor,
    W_K: torch.Tensor,
    b_K: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    with_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, ValueProjection | None]:
    """x [B, T, d] -> q, k [B, n_qk, T, d_qk] and v [B, n_qk, T, g] (the g scalar values of each group's heads) as
    a `ValueProjection` not computed yet: the fast attention projects it in its own autograd node (None without
    `with_values`, for a step whose z comes from cached inputs).

    On CPU in float32/64, and for fewer than `FUSED_PROJECTION_MIN_TOKENS` tokens (a decode step), Q and K
    are batched matmuls over the QK groups against the stored [n_qk, d, d_qk] layout: no copy of the weights,
    forward or backward, and their gradients land in the stored layout (forward plus backward on 2 CPU cores:
    10% faster than one matmul against a fused copy at Pythia-160M size, 2.4x at Llama-3.1-8B size).
    Otherwise they are one matmul against a fused [d, 2 n_qk d_qk] copy of the weights: in reduced precision
    the weights' cast (autocast) writes that copy anyway, while a batched matmul would copy the shared x once
    per group (measured on CPU); on an accelerator one large matmul is the safe choice. V will be one matmul
    against its stored [n_ov, d] layout, which already is the one a matmul wants.
    """
    batch_size, seq_len, d = hidden_states.shape
    n_qk = W_Q.shape[0]
    dtype = _autocast_dtype(hidden_states.device.type, W_Q.dtype)
    cpu_full_precision = hidden_states.device.type == "cpu" and dtype in (torch.float32, torch.float64)
    if cpu_full_precision or batch_size * seq_len < FUSED_PROJECTION_MIN_TOKENS:
        tokens = hidden_states.reshape(1, batch_size * seq_len, d).expand(n_qk, -1, -1)
        query = torch.baddbmm(b_Q[:, None, :], tokens, W_Q).view(n_qk, batch_size, seq_len, -1).transpose(0, 1)
        key = torch.baddbmm(b_K[:, None, :], tokens, W_K).view(n_qk, batch_size, seq_len, -1).transpose(0, 1)
    else:
        weight = torch.cat((W_Q.to(dtype), W_K.to(dtype))).permute(1, 0, 2).reshape(d, -1)  # [d, 2 n_qk d_qk]
        query_key = torch.addmm(torch.cat((b_Q, b_K)).reshape(-1), hidden_states.reshape(-1, d), weight)
        query, key = query_key.view(batch_size, seq_len, 2 * n_qk, -1).transpose(1, 2).chunk(2, dim=1)
    return query, key, ValueProjection(hidden_states, W_V, b_V, n_qk) if with_values else None


def reference_projections(
    hidden_states: torch.Tensor,
    W_Q: torch.Tensor,
    b_Q: torch.Tensor,
    W_K: torch.Tensor,
    b_K: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    with_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`project_queries_keys_values` as the reference implementations write it: one einsum per weight."""
    query = torch.einsum("btd,hdk->bhtk", hidden_states, W_Q) + b_Q[None, :, None, :]
    key = torch.einsum("btd,hdk->bhtk", hidden_states, W_K) + b_K[None, :, None, :]
    return query, key, project_values(hidden_states, W_V, b_V, W_Q.shape[0]) if with_values else None


ATTENTION_BLOCK_ROWS = 64
# whether the backward of values projected in the attention node goes through x; None: the cheaper (by FLOPs)
BACKWARD_FROM_INPUTS: bool | None = None
# backward from v takes as many heads at a time as keep a block's temporaries ([heads, rows, max(end, g)]) near
# this (from x, all heads at once: its per-block temporaries [n_qk, rows, d] are those of the larger matmuls)
BACKWARD_CHUNK_ELEMENTS = 2**17


def _query_blocks(mask: torch.Tensor | None, query_length: int, key_length: int) -> list[tuple[int, int, int, int]]:
    """Blocks of query rows [start, stop) with the number of leading keys `end` that some row of the block may
    see, and the first key column `masked_from` that some row of the block may not see. Under a causal mask
    the keys after `end` are masked for the whole block, so it skips them (with blocks of 64 rows at
    T = S = 256 the attention does 62.5% of the full T x S work), and only the columns from `masked_from` on
    (the block's diagonal) need the mask. Both are read from the mask, so no key a row may see is skipped."""
    rows = max(ATTENTION_BLOCK_ROWS, -(-query_length // 8))
    starts = range(0, query_length, rows)
    if mask is None:
        return [(start, min(start + rows, query_length), key_length, key_length) for start in starts]
    mask = mask.reshape(-1, query_length, key_length)
    seen, hidden = mask.any(0), ~mask.all(0)  # [T, S]: a key some sequence's row may see / may not see
    blocks = []
    for start in starts:
        stop = min(start + rows, query_length)
        visible, masked = seen[start:stop].any(0).nonzero(), hidden[start:stop].any(0).nonzero()
        end = int(visible[-1]) + 1 if len(visible) else 1
        blocks.append((start, stop, end, min(int(masked[0]), end) if len(masked) else end))
    return blocks


def _sequence_mask(mask: torch.Tensor | None, b: int) -> torch.Tensor | None:
    """Sequence b's [T, S] slice of a boolean mask [B or 1, 1, T, S] (None stays None)."""
    return None if mask is None else mask[b if mask.shape[0] > 1 else 0, 0]


def _block_pattern(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, block: tuple[int, int, int, int],
    scale: float, empty_rows: bool,
) -> torch.Tensor:
    """Softmax pattern P [H, rows, end] of one sequence's query rows start:stop (q [H, T, d_qk]) against its first
    `end` keys (k [H, S, d_qk]); mask [T, S] or None. Rows that may see no key (`empty_rows`) get zeros."""
    start, stop, end, masked_from = block
    logits = torch.matmul(query[:, start:stop], key[:, :end].transpose(-1, -2)).mul_(scale)
    if mask is not None and masked_from < end:
        hidden = ~mask[start:stop, masked_from:end]
        logits[..., masked_from:].masked_fill_(hidden, torch.finfo(logits.dtype).min)
    pattern = torch.softmax(logits, dim=-1)
    if empty_rows:
        pattern.masked_fill_(~mask[start:stop, :end].any(-1, keepdim=True), 0.0)
    return pattern


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


# what a number of a row gathered and added by `embedding_bag` costs, in multiply-adds of a large matmul: 8 as
# measured on 2 CPU cores; elsewhere not measured (no GPU was at hand): gathers are bandwidth-bound while a GPU's
# matmuls run on tensor cores, so a conservative 64 keeps the backward through v unless g is far larger than d
GATHER_COST = {"cpu": 8}
GATHER_COST_UNMEASURED = 64


def _backward_from_inputs(
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


def _bag_sum(
    table: torch.Tensor, entries: torch.Tensor, bags: torch.Tensor, weights: torch.Tensor, num_bags: int
) -> torch.Tensor:
    """out[b] = sum of weights[e] table[entries[e]] over the entries e with bags[e] == b: [num_bags, table width],
    zeros for empty bags. An `embedding_bag` once the entries are sorted by bag (a stable integer sort: a radix
    sort on CPU, 8x faster than sorting the same keys as floats)."""
    order = torch.argsort(bags, stable=True)
    counts = torch.bincount(bags, minlength=num_bags)
    return F.embedding_bag(
        entries[order], table, counts.cumsum(0) - counts, per_sample_weights=weights[order].to(table.dtype), mode="sum"
    )


class _BlockedSparseAttention(torch.autograd.Function):
    """Attention of every QK group and the TopK selection as one node, so that the gradient stays sparse:
    q [B, H, T, d_qk], k [B, H, S, d_qk] and either v [B, H, S, g] or the x [B, S, d], W_V [n_ov, d] and b_V [n_ov]
    that project it -> z [N, n_ov] (head i = group * g + j), the kept activations [N, K] and their heads [N, K].

    Forward runs blocks of query rows against only the keys their mask lets them see (`_query_blocks`) and
    selects each block's TopK as soon as its z is known. Kept for backward: q, k, the [N, K] selection and v, or
    x instead of v when the node projected it (`sparse_attention_top_k` hands it x, W_V and b_V where the
    backward is cheaper through x: `_backward_from_inputs`); no [T, S] pattern and nothing of size N x n_ov.
    Backward goes block by block, recomputes each block's pattern and uses that a softmax row's gradient is
    P * (dP - sum(dP * P)), in place; dP and the way to v's weights come from v
    (`_attention_backward_through_values`) or from x (`_attention_backward_through_inputs`). Query rows that
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
            sequence_mask = _sequence_mask(mask, b)
            for block in blocks:
                start, stop, end, _ = block
                pattern = _block_pattern(query[b], key[b], sequence_mask, block, scale, empty_rows)
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
            grad_query, grad_key, *projection = _attention_backward_through_inputs(
                ctx, query, key, hidden_states, W_V, mask, indices, grad_z, grad_values
            )
            return grad_query, grad_key, None, *projection, *[None] * 7
        gradients = _attention_backward_through_values(ctx, query, key, value, mask, indices, grad_z, grad_values)
        return *gradients, *[None] * 10


def _attention_backward_through_values(
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
        sequence_mask = _sequence_mask(mask, b)
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

                pattern = _block_pattern(q, k, sequence_mask, block, ctx.scale, ctx.empty_rows)
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


def _attention_backward_through_inputs(
    ctx, query: torch.Tensor, key: torch.Tensor, hidden_states: torch.Tensor, W_V: torch.Tensor,
    mask: torch.Tensor | None, indices: torch.Tensor, grad_z: torch.Tensor | None, grad_values: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """dq, dk, dx, dW_V, db_V of `_BlockedSparseAttention` when it projected v itself, through x rather than v
    (`_backward_from_inputs`), all heads of a block at once, in two passes over the blocks:

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
            sequence_mask = _sequence_mask(mask, b)
            for block in blocks:
                start, stop, end, _ = block
                pattern = _block_pattern(query[b], key[b], sequence_mask, block, ctx.scale, ctx.empty_rows)
                mixed[:, b, start:stop] = torch.matmul(pattern, x[b, :end])
        grad_W_V = _value_weight_gradient(mixed, grad_z, grad_values, indices, group_size)
        del mixed, pattern
    if ctx.needs_input_grad[5]:
        grad_b_V = _value_bias_gradient(ctx, grad_z, grad_values, indices, mask, batch_size, heads * group_size)

    grad_query, grad_key = torch.empty_like(query), torch.empty_like(key)
    grad_x = torch.zeros_like(x) if ctx.needs_input_grad[3] else None
    grouped_W_V = W_V.view(heads, group_size, d)
    for b in range(batch_size):
        sequence_mask = _sequence_mask(mask, b)
        # the block that sees the most keys first: it writes dk, the others add to it
        for number in reversed(range(len(blocks))):
            start, stop, end, _ = block = blocks[number]
            first, tokens = number == len(blocks) - 1, slice(b * query_length + start, b * query_length + stop)
            rows = stop - start
            if grad_values is not None:  # u [H, rows, d]: per group, the W_V rows of its kept heads times their dz
                heads_kept = indices[tokens].reshape(-1)
                row = torch.arange(rows, device=x.device).repeat_interleave(top_k)
                bags = (heads_kept // group_size) * rows + row
                grad_sums = _bag_sum(W_V, heads_kept, bags, grad_values[tokens].reshape(-1), heads * rows)
            else:
                grad_sums = torch.zeros(heads * rows, d, dtype=W_V.dtype, device=x.device)
            grad_sums = grad_sums.view(heads, rows, d)
            if grad_z is not None:
                grad_block = grad_z[tokens].view(rows, heads, group_size).transpose(0, 1).to(W_V.dtype)
                grad_sums.baddbmm_(grad_block, grouped_W_V)
            grad_sums = grad_sums.to(dtype)

            pattern = _block_pattern(query[b], key[b], sequence_mask, block, ctx.scale, ctx.empty_rows)
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
        grad_W_V = _bag_sum(mixed.view(-1, d), entries, heads_kept, grad_values.reshape(-1), n_ov)
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


def select_from_groups(
    z: torch.Tensor, norms: torch.Tensor, top_k: int, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z per QK group [B, n_qk, T, g] -> (z [N, n_ov] with head i = group * g + j, the kept activations [N, K],
    differentiable through a gather, and their heads [N, K])."""
    z = z.transpose(1, 2).reshape(-1, norms.shape[0])
    indices = select_top_k(z, norms, top_k, activation)
    return z, kept_activations(z, indices, activation), indices


def dense_attention_top_k(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, scale: float,
    W_O: torch.Tensor, top_k: int, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: the full unfused attention of every QK group, then TopK over z, through autograd.

    q [B, n_qk, T, d_qk], k [B, n_qk, S, d_qk], v [B, n_qk, S, g] -> (z [N, n_ov], kept values [N, K], heads [N, K]).
    """
    z = group_attention(query, key, value, attention_mask, scale)
    return select_from_groups(z, W_O.detach().norm(dim=-1), top_k, activation)


def sparse_attention_top_k(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | ValueProjection, attention_mask: object,
    scale: float, W_O: torch.Tensor, top_k: int, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dense_attention_top_k`, skipping the work a causal mask makes void and keeping the gradient sparse; v
    may come as the `ValueProjection` that computes it.

    Two kernels, by what is faster on the shape:
    - PyTorch's fused (flash) attention for long keys. It wants value width == d_qk, so the g values of a group
      are split into g / d_qk chunks, one kernel call each with the group's own q and k. It skips masked blocks
      and keeps no [T, S] pattern, but recomputes the q.k logits per chunk, and on CPU runs well below the matmul
      rate. Measured on 2 CPU cores (training step of the attention alone): at T = 1024, g = 2 d_qk about 3x
      faster than the full unfused attention; at T = 256, or at g = 8 d_qk, slower. So it runs for at most two
      chunks and keys longer than 2 g.
    - Otherwise `_BlockedSparseAttention`: batched matmuls over blocks of query rows, each against the keys its
      mask lets it see (62.5% of the T x S work at T = 256 under a causal mask), with the selection in the same
      node, and the V projection too when v comes as a `ValueProjection` and the backward is cheaper through x
      (`_backward_from_inputs`).
    """
    batch_size, n_qk, query_length, d_qk = query.shape
    projected = isinstance(value, ValueProjection)
    key_length = key.shape[-2]
    group_size = value.W_V.shape[0] // n_qk if projected else value.shape[-1]
    norms = decoder_norms(W_O)
    flash = group_size % d_qk == 0 and group_size // d_qk <= 2 and key_length > 2 * group_size
    causal = attention_mask is None and query_length == key_length
    mask = None
    if not (flash and causal):  # the flash kernel's own causal flag needs no mask
        mask = boolean_attention_mask(attention_mask, batch_size, query_length, key_length, query.device)
    if flash:
        z = torch.cat([
            F.scaled_dot_product_attention(query, key, chunk, attn_mask=mask, is_causal=causal, scale=scale)
            for chunk in as_values(value).split(d_qk, dim=-1)  # [B, n_qk, S, d_qk] views of v
        ], dim=-1)
        return select_from_groups(z, norms, top_k, activation)
    if mask is not None and mask.shape[1] != 1:  # a per-head mask (none of transformers' forms)
        z = group_attention(query, key, as_values(value), mask, scale)
        return select_from_groups(z, norms, top_k, activation)
    blocks = _query_blocks(mask, query_length, key_length)
    if projected:  # the node projects v itself where its backward is then cheaper from x
        x = value.hidden_states
        input_gradient = torch.is_grad_enabled() and x.requires_grad
        cheaper = _backward_from_inputs(
            blocks, query_length, group_size, x.shape[-1], n_qk, top_k, input_gradient, x.device.type
        )
        if not cheaper:
            value, projected = as_values(value), False
    # one dtype for all three, as autocast would give the matmuls (q and k leave the rotary in float32)
    device_type = query.device.type
    value_dtype = value.W_V.dtype if projected else value.dtype
    dtype = _autocast_dtype(device_type, torch.promote_types(torch.promote_types(query.dtype, key.dtype), value_dtype))
    with torch.autocast(device_type, enabled=False):
        query, key = query.to(dtype), key.to(dtype)
        value, projection = (None, value[:3]) if projected else (value.to(dtype), (None, None, None))
        return _BlockedSparseAttention.apply(
            query, key, value, *projection, mask, blocks, scale, norms, top_k, activation
        )


def input_form_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    inputs: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    attention_mask: object,
    scale: float,
) -> torch.Tensor:
    """z from cached inputs: z_i[s] = (sum_t A_h(i)[s, t] x[t]) . W_V[i] + b_V[i], exact because softmax rows sum to 1.

    q [B, n_qk, T, d_qk], k [B, n_qk, S, d_qk], inputs: the cached x as [B, H', S, d / H'] (any H' dividing d)
    -> z [B, n_qk, T, g], the layout `group_attention` returns. One mixing matmul over x serves all groups;
    the projection afterwards reads W_V once. Query rows with no key to attend to give zeros, as in
    `group_attention`.
    """
    batch_size, n_qk, query_length, _ = query.shape
    key_length = key.shape[-2]
    x = inputs.transpose(1, 2).reshape(batch_size, key_length, -1)  # [B, S, d]
    d = x.shape[-1]
    logits = torch.matmul(query, key.transpose(-1, -2)) * scale  # [B, n_qk, T, S]
    mask = boolean_attention_mask(attention_mask, batch_size, query_length, key_length, query.device)
    if mask is not None:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    pattern = torch.softmax(logits, dim=-1)
    mixed = torch.bmm(pattern.reshape(batch_size, n_qk * query_length, key_length), x.to(pattern.dtype))
    mixed = mixed.view(batch_size, n_qk, query_length, d).transpose(0, 1).reshape(n_qk, -1, d)  # [n_qk, B*T, d]
    weight = W_V.view(n_qk, -1, d)  # [n_qk, g, d]: head i = group * g + j
    z = torch.baddbmm(b_V.view(n_qk, 1, -1), mixed, weight.transpose(1, 2))  # [n_qk, B*T, g]
    z = z.view(n_qk, batch_size, query_length, -1).transpose(0, 1)
    if mask is not None:
        z = z.masked_fill(~mask.any(-1)[..., None], 0.0)
    return z


def decoder_norms(W_O: torch.Tensor) -> torch.Tensor:
    """||W_O[i]|| [n_ov], without gradient (they only rank heads). Outside training (no gradient wanted for W_O)
    the result is kept on W_O and reused until W_O changes (a new tensor, or an in-place change, which bumps its
    version): a decode step then reads no more than K rows of W_O. An in-place change through `W_O.data` is
    invisible to PyTorch's version counter; after one, `del W_O.lorsa_decoder_norms` drops the kept norms."""
    training = torch.is_grad_enabled() and W_O.requires_grad
    with torch.no_grad():
        if training:
            return W_O.norm(dim=-1)
        key = (W_O.data_ptr(), W_O._version, W_O.dtype)
        cached = getattr(W_O, "lorsa_decoder_norms", None)
        if cached is None or cached[0] != key:
            cached = (key, W_O.norm(dim=-1))
            W_O.lorsa_decoder_norms = cached
        return cached[1]


@torch.no_grad()
def select_top_k(
    z: torch.Tensor, decoder_norms: torch.Tensor, top_k: int, activation: str, among: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices [N, K] of the K heads with the largest score |z| ||W_O|| ("topk_abs") or relu(z) ||W_O||;
    with `among` (boolean [n_ov]) only those heads compete (the auxiliary loss picks among dead heads)."""
    scores = z.abs() if activation == "topk_abs" else z.relu()
    scores = scores.to(torch.promote_types(z.dtype, decoder_norms.dtype)).mul_(decoder_norms)
    if among is not None:
        scores = scores.masked_fill_(~among, -1.0)
    return scores.topk(top_k, dim=-1, sorted=False).indices


def kept_activations(z: torch.Tensor, indices: torch.Tensor, activation: str) -> torch.Tensor:
    """The activations a at the selected heads [N, K]: signed z ("topk_abs") or relu(z) ("topk_relu")."""
    values = z.gather(-1, indices)
    return values.relu() if activation == "topk_relu" else values


def dense_top_k_decode(values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """The reference decode: the activations scattered into a dense [N, n_ov] tensor, then a matmul with all of
    W_O (autograd differentiates through every head). values, indices [N, K] -> [N, d] without b_O."""
    activations = torch.zeros(values.shape[0], W_O.shape[0], dtype=values.dtype, device=values.device)
    activations = activations.scatter(-1, indices, values)
    return activations @ W_O.to(activations.dtype)


def sparse_decode(values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """sum_k values[n, k] W_O[indices[n, k]]: [N, K] x2 -> [N, d], reading only the selected rows of W_O.

    On CUDA a Triton kernel when Triton is installed, otherwise `embedding_bag` with per-sample weights.
    """
    values = values.to(W_O.dtype)
    if W_O.is_cuda:
        from .kernels import triton_sparse_decode

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
    return _bag_sum(grad_output, tokens, indices.reshape(-1), values.reshape(-1), n_ov)


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
