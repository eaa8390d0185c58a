"""The fast Lorsa path (LORSA.md section 1b) and the dense reference it is tested and benchmarked against.

Both paths compute the same function and share the TopK selection rule; they differ in how:

- dense (the formulation of the reference implementations): einsum projections, the unfused attention with its
  [T, S] pattern, the activations scattered into a [N, n_ov] tensor and decoded with a dense matmul against all
  of W_O; autograd then differentiates through every head.
- sparse: fused Q/K projection, PyTorch's fused causal attention in chunks of d_qk values, and a custom
  autograd function that decodes only the K selected rows of W_O per token (`embedding_bag` with per-sample
  weights, or a Triton kernel on CUDA) and whose backward sends gradient to z only at the selected entries and
  to W_O only in the selected rows; it keeps just the [N, K] indices and values for backward.

For generation, `input_form_attention` computes z from a cache that holds the layer's input x instead of the
n_ov values per token (the softmax rows sum to one, so attending over x and projecting afterwards is exact).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ._attention import boolean_attention_mask, group_attention

FUSED_PROJECTION_MIN_TOKENS = 64


def project_queries_keys_values(
    hidden_states: torch.Tensor,
    W_Q: torch.Tensor,
    b_Q: torch.Tensor,
    W_K: torch.Tensor,
    b_K: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    with_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [B, T, d] -> q and k stacked [B, 2 n_qk, T, d_qk] (queries first) and v [B, n_qk, T, g] (the g scalar
    values of each group's heads; None without `with_values`, for a step whose z comes from cached inputs).

    From `FUSED_PROJECTION_MIN_TOKENS` tokens on, Q and K are one matmul with a fused [2 n_qk d_qk, d] weight
    (rebuilt per call from the stored [n_qk, d, d_qk] layout, so gradients flow and nothing can go stale; the copy
    is small next to the matmul). For fewer tokens (a decode step) the copy would cost more than the
    matrix-vector product itself, so Q and K are batched over the groups against the stored layout. V is one
    matmul against its stored [n_ov, d] layout, which already is the one a matmul wants.
    """
    batch_size, seq_len, d = hidden_states.shape
    n_qk, _, d_qk = W_Q.shape
    if batch_size * seq_len >= FUSED_PROJECTION_MIN_TOKENS:
        weight = torch.cat((W_Q.transpose(1, 2).reshape(-1, d), W_K.transpose(1, 2).reshape(-1, d)))
        query_key = F.linear(hidden_states, weight, torch.cat((b_Q.reshape(-1), b_K.reshape(-1))))
        query_key = query_key.view(batch_size, seq_len, 2 * n_qk, d_qk).transpose(1, 2)
    else:
        tokens = hidden_states.reshape(1, batch_size * seq_len, d).expand(n_qk, -1, -1)
        query = torch.baddbmm(b_Q[:, None, :], tokens, W_Q)  # [n_qk, B*T, d_qk]
        key = torch.baddbmm(b_K[:, None, :], tokens, W_K)
        query_key = torch.cat((query, key)).view(2 * n_qk, batch_size, seq_len, d_qk).transpose(0, 1)
    if not with_values:
        return query_key, None
    value = F.linear(hidden_states, W_V, b_V).view(batch_size, seq_len, n_qk, -1).transpose(1, 2)
    return query_key, value


def reference_projections(
    hidden_states: torch.Tensor,
    W_Q: torch.Tensor,
    b_Q: torch.Tensor,
    W_K: torch.Tensor,
    b_K: torch.Tensor,
    W_V: torch.Tensor,
    b_V: torch.Tensor,
    with_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`project_queries_keys_values` as the reference implementations write it: one einsum per weight."""
    batch_size, seq_len, _ = hidden_states.shape
    query = torch.einsum("btd,hdk->bhtk", hidden_states, W_Q) + b_Q[None, :, None, :]
    key = torch.einsum("btd,hdk->bhtk", hidden_states, W_K) + b_K[None, :, None, :]
    query_key = torch.cat((query, key), dim=1)
    if not with_values:
        return query_key, None
    value = F.linear(hidden_states, W_V, b_V).view(batch_size, seq_len, W_Q.shape[0], -1).transpose(1, 2)
    return query_key, value


ATTENTION_BLOCK_ROWS = 64


def _query_blocks(mask: torch.Tensor | None, query_length: int, key_length: int) -> list[tuple[int, int, int]]:
    """Blocks of query rows [start, stop) with the number of leading keys `end` that some row of the block may
    see. Under a causal mask the keys after `end` are masked for the whole block, so it skips them: with blocks
    of 64 rows at T = S = 256 the attention does 62.5% of the full T x S work. Whatever the mask, `end` is read
    from it, so no key that any row may see is ever skipped."""
    rows = max(ATTENTION_BLOCK_ROWS, -(-query_length // 8))
    starts = range(0, query_length, rows)
    if mask is None:
        return [(start, min(start + rows, query_length), key_length) for start in starts]
    seen = mask.reshape(-1, query_length, key_length).any(0)  # [T, S]: a key some sequence's row may see
    blocks = []
    for start in starts:
        stop = min(start + rows, query_length)
        visible = seen[start:stop].any(0).nonzero()
        blocks.append((start, stop, int(visible[-1]) + 1 if len(visible) else 1))
    return blocks


class _BlockedGroupAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v per QK group over blocks of query rows, each against only the keys its mask lets
    it see (`_query_blocks`): q [B, H, T, d_qk], k [B, H, S, d_qk], v [B, H, S, g] -> z [B, H, T, g].

    Forward keeps each block's softmax pattern; backward uses that the softmax gradient of a row is
    P * (dP - sum(dP * P)), in place, and accumulates dv and dk block by block. Query rows that may see no key
    at all (padding) give zeros, as `group_attention` does."""

    @staticmethod
    def forward(ctx, query, key, value, mask, scale: float):
        batch_size, heads, query_length, _ = query.shape
        key_length = key.shape[-2]
        blocks = _query_blocks(mask, query_length, key_length)
        keep = any(ctx.needs_input_grad[:3])
        value = value.contiguous()  # v^T in backward: a plain transposed matrix (bf16 matmuls copy anything else)
        # z is written in the [B, T, H, g] layout, so that the [N, n_ov] view the selection reads is free
        z = torch.empty(batch_size, query_length, heads, value.shape[-1], dtype=value.dtype, device=value.device)
        patterns = []
        for b in range(batch_size):
            block_mask = None if mask is None else mask[b if mask.shape[0] > 1 else 0, 0]  # [T, S]
            for start, stop, end in blocks:
                logits = torch.matmul(query[b, :, start:stop], key[b, :, :end].transpose(-1, -2))  # [H, rows, end]
                logits.mul_(scale)
                rows_seeing_nothing = None
                if block_mask is not None:
                    allowed = block_mask[start:stop, :end]
                    logits.masked_fill_(~allowed, torch.finfo(logits.dtype).min)
                    rows_seeing_nothing = ~allowed.any(-1)
                pattern = torch.softmax(logits, dim=-1)
                del logits
                if rows_seeing_nothing is not None and rows_seeing_nothing.any():
                    pattern.masked_fill_(rows_seeing_nothing[:, None], 0.0)
                z[b, start:stop] = torch.matmul(pattern, value[b, :, :end]).transpose(0, 1)
                if keep:
                    patterns.append(pattern)
        ctx.blocks, ctx.scale = blocks, scale
        if keep:
            ctx.save_for_backward(query, key, value, *patterns)
        return z.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad_z: torch.Tensor):
        query, key, value, *patterns = ctx.saved_tensors
        batch_size, blocks = query.shape[0], ctx.blocks
        grad_query, grad_key, grad_value = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
        for b in range(batch_size):
            # the block that sees the most keys first: it writes dk and dv, the others add to them
            for number in reversed(range(len(blocks))):
                start, stop, end = blocks[number]
                pattern = patterns[b * len(blocks) + number]  # P [H, rows, end]
                grad_block = grad_z[b, :, start:stop]  # dz [H, rows, g]
                grad_logits = torch.matmul(grad_block, value[b, :, :end].transpose(-1, -2))  # dP [H, rows, end]
                grad_logits.mul_(pattern)
                grad_logits.addcmul_(pattern, grad_logits.sum(-1, keepdim=True), value=-1.0)  # softmax backward
                grad_query[b, :, start:stop] = torch.matmul(grad_logits, key[b, :, :end]).mul_(ctx.scale)
                grad_key_block = torch.matmul(grad_logits.transpose(-1, -2), query[b, :, start:stop]).mul_(ctx.scale)
                grad_value_block = torch.matmul(pattern.transpose(-1, -2), grad_block)
                if number == len(blocks) - 1:
                    grad_key[b, :, :end], grad_value[b, :, :end] = grad_key_block, grad_value_block
                    grad_key[b, :, end:], grad_value[b, :, end:] = 0.0, 0.0
                else:
                    grad_key[b, :, :end] += grad_key_block
                    grad_value[b, :, :end] += grad_value_block
        return grad_query, grad_key, grad_value, None, None


def fused_group_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, scale: float
) -> torch.Tensor:
    """`group_attention` [B, n_qk, T, g] for any transformers mask, skipping the work a causal mask makes void.

    Two kernels, by what is faster on the shape:
    - PyTorch's fused (flash) attention for long keys. It wants value width == d_qk, so the g values of a group
      are split into g / d_qk chunks, one kernel call each with the group's own q and k. It skips masked blocks
      and keeps no [T, S] pattern, but recomputes the q.k logits per chunk, and on CPU runs well below the matmul
      rate. Measured on 2 CPU cores (training step of the attention alone): at T = 1024, g = 2 d_qk about 3x
      faster than the full unfused attention; at T = 256, or at g = 8 d_qk, slower. So it runs for at most two
      chunks and keys longer than 2 g.
    - Otherwise `_BlockedGroupAttention`: batched matmuls over blocks of query rows, each against the keys its
      mask lets it see (62.5% of the T x S work at T = 256 under a causal mask), with its own backward.
    """
    batch_size, n_qk, query_length, d_qk = query.shape
    key_length, group_size = key.shape[-2], value.shape[-1]
    mask = boolean_attention_mask(attention_mask, batch_size, query_length, key_length, query.device)
    chunks = group_size // d_qk
    if group_size % d_qk != 0 or chunks > 2 or key_length <= 2 * group_size:
        if mask is not None and mask.shape[1] != 1:
            return group_attention(query, key, value, mask, scale)  # a per-head mask (none of transformers' forms)
        # one dtype for all three, as autocast would give the matmuls (q and k leave the rotary in float32)
        device_type = query.device.type
        if torch.is_autocast_enabled(device_type):
            dtype = torch.get_autocast_dtype(device_type)
        else:
            dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
        with torch.autocast(device_type, enabled=False):
            return _BlockedGroupAttention.apply(query.to(dtype), key.to(dtype), value.to(dtype), mask, scale)
    causal = attention_mask is None and query_length == key_length
    z = [
        F.scaled_dot_product_attention(
            query, key, chunk, attn_mask=None if causal else mask, is_causal=causal, scale=scale
        )
        for chunk in value.split(d_qk, dim=-1)  # [B, n_qk, S, d_qk] views of v
    ]
    return torch.cat(z, dim=-1)


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


def dense_top_k_decode(
    z: torch.Tensor, W_O: torch.Tensor, top_k: int, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: activations scattered into a dense [N, n_ov] tensor, decoded by a matmul with all of W_O.

    z [N, n_ov] -> (output [N, d] without b_O, kept values [N, K], their heads [N, K]).
    """
    indices = select_top_k(z, W_O.detach().norm(dim=-1), top_k, activation)
    values = kept_activations(z, indices, activation)
    activations = torch.zeros_like(z).scatter(-1, indices, values)
    return activations @ W_O.to(activations.dtype), values, indices


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
    that selected head i. That is itself an `embedding_bag`, with one bag per head over the token rows."""
    num_tokens, top_k = indices.shape
    flat = indices.reshape(-1)
    # sorting the head indices as floats (exact below 2**24 heads) is over 50x faster on CPU than as int64 here
    order = torch.argsort(flat.to(torch.float32 if n_ov <= 2**24 else torch.float64))
    offsets = torch.zeros(n_ov, dtype=torch.long, device=flat.device)
    offsets[1:] = torch.bincount(flat, minlength=n_ov).cumsum(0)[:-1]
    tokens = torch.div(order, top_k, rounding_mode="floor")
    return F.embedding_bag(
        tokens, grad_output, offsets, per_sample_weights=values.reshape(-1)[order].to(grad_output.dtype), mode="sum"
    )


class _SparseTopKDecode(torch.autograd.Function):
    """TopK selection and sparse decode as one autograd node: z [N, n_ov], W_O [n_ov, d] -> (output [N, d],
    values [N, K], indices [N, K]). Saved for backward: the [N, K] indices and values, and W_O."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, W_O: torch.Tensor, norms: torch.Tensor, top_k: int, activation: str):
        indices = select_top_k(z, norms, top_k, activation)
        values = kept_activations(z, indices, activation)
        output = sparse_decode(values, indices, W_O)
        ctx.save_for_backward(indices, values, W_O)
        ctx.relu = activation == "topk_relu"
        ctx.z_shape, ctx.z_dtype = z.shape, z.dtype
        ctx.mark_non_differentiable(indices)
        return output, values, indices

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor, grad_values: torch.Tensor, grad_indices: None):
        indices, values, W_O = ctx.saved_tensors
        grad_z = grad_W_O = None
        if ctx.needs_input_grad[0]:
            grad_selected = _selected_rows_dot(grad_output, W_O, indices).to(values.dtype) + grad_values
            if ctx.relu:
                grad_selected = grad_selected * (values > 0)
            grad_z = torch.zeros(ctx.z_shape, dtype=ctx.z_dtype, device=values.device)
            grad_z.scatter_(-1, indices, grad_selected.to(ctx.z_dtype))
        if ctx.needs_input_grad[1]:
            grad_W_O = _selected_rows_gradient(grad_output.to(W_O.dtype), values, indices, W_O.shape[0])
        return grad_z, grad_W_O, None, None, None


def sparse_top_k_decode(
    z: torch.Tensor, W_O: torch.Tensor, top_k: int, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast path: z [N, n_ov] -> (output [N, d] without b_O, kept values [N, K], their heads [N, K]),
    with the same selection as `dense_top_k_decode` and work proportional to K, not n_ov, after it."""
    return _SparseTopKDecode.apply(z, W_O, decoder_norms(W_O), top_k, activation)
