"""The Lorsa projections of the fast path: q and k of every QK group, and the values v of its heads.

The values are not projected next to q and k: the attention that reads them projects them where it is cheaper
(`lorsa_hf.ops.attention`), and a cache of values projects them before it stores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FUSED_PROJECTION_MIN_TOKENS = 64


def autocast_dtype(device_type: str, default: torch.dtype) -> torch.dtype:
    """The dtype autocast gives matmuls on this device type, or `default` outside autocast."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else default


def project_values(hidden_states: torch.Tensor, W_V: torch.Tensor, b_V: torch.Tensor, n_qk: int) -> torch.Tensor:
    """v [B, n_qk, T, g] = x W_V^T + b_V, the g scalar values of each QK group's heads (head i = group * g + j).

    One matmul against W_V's stored [n_ov, d] layout, which already is the one a matmul wants."""
    batch_size, seq_len, _ = hidden_states.shape
    return F.linear(hidden_states, W_V, b_V).view(batch_size, seq_len, n_qk, -1).transpose(1, 2)


def project_queries_keys(
    hidden_states: torch.Tensor, W_Q: torch.Tensor, b_Q: torch.Tensor, W_K: torch.Tensor, b_K: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, d] -> q, k [B, n_qk, T, d_qk].

    On CPU in float32/64, and for fewer than `FUSED_PROJECTION_MIN_TOKENS` tokens (a decode step), Q and K
    are batched matmuls over the QK groups against the stored [n_qk, d, d_qk] layout: no copy of the weights,
    forward or backward, and their gradients land in the stored layout (docs/performance.md has the
    measurements). Otherwise they are one matmul against a fused [d, 2 n_qk d_qk] copy of the weights: in
    reduced precision the weights' cast (autocast) writes that copy anyway, while a batched matmul would copy
    the shared x once per group; on an accelerator one large matmul is the safe choice.
    """
    batch_size, seq_len, d = hidden_states.shape
    n_qk = W_Q.shape[0]
    dtype = autocast_dtype(hidden_states.device.type, W_Q.dtype)
    cpu_full_precision = hidden_states.device.type == "cpu" and dtype in (torch.float32, torch.float64)
    if cpu_full_precision or batch_size * seq_len < FUSED_PROJECTION_MIN_TOKENS:
        tokens = hidden_states.reshape(1, batch_size * seq_len, d).expand(n_qk, -1, -1)
        query = torch.baddbmm(b_Q[:, None, :], tokens, W_Q).view(n_qk, batch_size, seq_len, -1).transpose(0, 1)
        key = torch.baddbmm(b_K[:, None, :], tokens, W_K).view(n_qk, batch_size, seq_len, -1).transpose(0, 1)
        return query, key
    weight = torch.cat((W_Q.to(dtype), W_K.to(dtype))).permute(1, 0, 2).reshape(d, -1)  # [d, 2 n_qk d_qk]
    query_key = torch.addmm(torch.cat((b_Q, b_K)).reshape(-1), hidden_states.reshape(-1, d), weight)
    query, key = query_key.view(batch_size, seq_len, 2 * n_qk, -1).transpose(1, 2).chunk(2, dim=1)
    return query, key
