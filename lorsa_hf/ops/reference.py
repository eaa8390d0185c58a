"""The dense reference path: Lorsa as the reference implementations write it, which the fast path is tested and
benchmarked against.

Einsum projections, the full unfused attention of every QK group with its [T, S] pattern, the activations
scattered into a [N, n_ov] tensor and decoded with a dense matmul against all of W_O; autograd then
differentiates through every head. It shares the TopK selection rule with the fast path.
"""

from __future__ import annotations

import torch

from .masks import group_attention
from .projection import project_values
from .selection import select_from_groups


def reference_queries_keys(
    hidden_states: torch.Tensor, W_Q: torch.Tensor, b_Q: torch.Tensor, W_K: torch.Tensor, b_K: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`project_queries_keys` as the reference implementations write it: one einsum per weight."""
    query = torch.einsum("btd,hdk->bhtk", hidden_states, W_Q) + b_Q[None, :, None, :]
    key = torch.einsum("btd,hdk->bhtk", hidden_states, W_K) + b_K[None, :, None, :]
    return query, key


def dense_attention_top_k(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: object, scale: float,
    W_O: torch.Tensor, top_k: int, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference: the full unfused attention of every QK group, then TopK over z, through autograd.

    q [B, n_qk, T, d_qk], k [B, n_qk, S, d_qk], v [B, n_qk, S, g] -> (z [N, n_ov], kept values [N, K], heads [N, K]).
    """
    z = group_attention(query, key, value, attention_mask, scale)
    return select_from_groups(z, W_O.detach().norm(dim=-1), top_k, activation)


def dense_projected_attention_top_k(
    query: torch.Tensor, key: torch.Tensor, hidden_states: torch.Tensor, W_V: torch.Tensor, b_V: torch.Tensor,
    attention_mask: object, scale: float, W_O: torch.Tensor, top_k: int, activation: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`dense_attention_top_k` over the values v = x W_V^T + b_V of the keys' own tokens x [B, S, d]."""
    value = project_values(hidden_states, W_V, b_V, query.shape[1])
    return dense_attention_top_k(query, key, value, attention_mask, scale, W_O, top_k, activation)


def dense_top_k_decode(values: torch.Tensor, indices: torch.Tensor, W_O: torch.Tensor) -> torch.Tensor:
    """The reference decode: the activations scattered into a dense [N, n_ov] tensor, then a matmul with all of
    W_O (autograd differentiates through every head). values, indices [N, K] -> [N, d] without b_O."""
    activations = torch.zeros(values.shape[0], W_O.shape[0], dtype=values.dtype, device=values.device)
    activations = activations.scatter(-1, indices, values)
    return activations @ W_O.to(activations.dtype)
