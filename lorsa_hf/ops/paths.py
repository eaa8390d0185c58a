"""The two ways to compute a Lorsa layer, as one table: `PATHS[config.implementation]`.

Both compute the same function and share the TopK selection rule; they differ in how (docs/performance.md):
"dense" is the formulation of the reference implementations (`lorsa_hf.ops.reference`), "sparse" the fast path
(`lorsa_hf.ops.projection`, `lorsa_hf.ops.attention`, `lorsa_hf.ops.decode`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .attention import sparse_attention_top_k, sparse_projected_attention_top_k
from .decode import sparse_top_k_decode
from .projection import project_queries_keys
from .reference import (
    dense_attention_top_k,
    dense_projected_attention_top_k,
    dense_top_k_decode,
    reference_queries_keys,
)

Selection = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class LorsaPath(NamedTuple):
    """The functions of one path, in the order a layer's forward calls them.

    Args:
        project_queries_keys: x [B, T, d], W_Q, b_Q, W_K, b_K -> q, k [B, n_qk, T, d_qk].
        rotary_one_node: Whether the rotary runs as one autograd node (`lorsa_hf.ops.rotary.apply_rotary`).
        attention_top_k: Attention over given values v and the TopK selection -> (z [N, n_ov], the kept
            activations [N, K], their heads [N, K]).
        projected_attention_top_k: The same over the values of the keys' own tokens x, given x, W_V and b_V.
        decode: The kept activations and their heads [N, K] and W_O -> [N, d] without b_O.
    """

    project_queries_keys: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotary_one_node: bool
    attention_top_k: Callable[..., Selection]
    projected_attention_top_k: Callable[..., Selection]
    decode: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


PATHS: dict[str, LorsaPath] = {
    "dense": LorsaPath(
        reference_queries_keys, False, dense_attention_top_k, dense_projected_attention_top_k, dense_top_k_decode
    ),
    "sparse": LorsaPath(
        project_queries_keys, True, sparse_attention_top_k, sparse_projected_attention_top_k, sparse_top_k_decode
    ),
}
