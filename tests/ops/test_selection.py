"""The TopK selection ranks heads by their decoder norms, kept for inference until W_O changes."""

from __future__ import annotations

import torch

from tests.ops.conftest import LAYER, lorsa_pair


def test_decoder_norms_kept_for_inference_follow_in_place_updates():
    sparse, dense = lorsa_pair("topk_abs")
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        sparse(x)  # keeps the decoder norms on W_O
        for lorsa in (sparse, dense):
            lorsa.layer(LAYER).W_O[::3].mul_(5.0)  # as an optimizer step would: in place, version bumped
        selected_sparse, selected_dense = sparse(x).top_k_indices, dense(x).top_k_indices
    assert torch.equal(selected_sparse.sort(-1).values, selected_dense.sort(-1).values)
