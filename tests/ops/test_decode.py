"""The sparse decode keeps only the selection for backward, and on CUDA its Triton kernel equals `embedding_bag`."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf.ops.decode import load_triton_decode, sparse_decode
from tests.ops.conftest import lorsa_pair, requires_cuda


def _saved_by_decode(output: torch.Tensor) -> list[torch.Size]:
    """Shapes of what the autograd node that produced the decode output keeps for backward."""
    node = output.grad_fn
    while node is not None and "TopK" not in type(node).__name__ and "Mm" not in type(node).__name__:
        node = node.next_functions[0][0]
    saved = node.saved_tensors if hasattr(node, "saved_tensors") else (node._saved_self, node._saved_mat2)
    return [tensor.shape for tensor in saved]


def test_sparse_decode_keeps_only_the_selection_for_backward():
    """The sparse node keeps [N, K] indices and values and W_O; the dense decode keeps [N, n_ov] activations."""
    n_ov, tokens, top_k = 512, 2 * 16, 8
    sparse, dense = lorsa_pair("topk_abs", n_ov_heads=n_ov, top_k=top_k)
    x = torch.randn(2, 16, 64)
    saved_sparse = _saved_by_decode(sparse(x).hidden_states)
    saved_dense = _saved_by_decode(dense(x).hidden_states)
    assert sorted(map(tuple, saved_sparse)) == [(tokens, top_k), (tokens, top_k), (n_ov, 64)]
    assert (tokens, n_ov) in map(tuple, saved_dense)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sparse_decode_kernel_equals_embedding_bag(dtype):
    if load_triton_decode() is None:
        pytest.skip("Triton is not installed: the CUDA path falls back to embedding_bag")
    generator = torch.Generator(device="cuda").manual_seed(0)
    W_O = torch.randn(3000, 300, device="cuda", generator=generator).to(dtype)
    indices = torch.randint(0, 3000, (77, 45), device="cuda", generator=generator)
    values = torch.randn(77, 45, device="cuda", generator=generator).to(dtype)
    expected = torch.nn.functional.embedding_bag(indices, W_O.float(), per_sample_weights=values.float(), mode="sum")
    actual = sparse_decode(values, indices, W_O)
    torch.testing.assert_close(actual.float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)
