"""The fast Q/K projections and the V projection equal the reference einsums."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf.ops.projection import project_queries_keys, project_values
from lorsa_hf.ops.reference import reference_queries_keys


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [5, 40])
def test_projections_equal_the_reference_einsums(dtype, seq_len):
    """float32/64 and few tokens take batched matmuls over the groups, reduced precision with many tokens one
    matmul with a fused weight."""
    generator = torch.Generator().manual_seed(0)
    n_qk, d, d_qk, n_ov = 3, 16, 4, 12

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    weights = (tensor(n_qk, d, d_qk), tensor(n_qk, d_qk), tensor(n_qk, d, d_qk), tensor(n_qk, d_qk))
    value_weights = (tensor(n_ov, d), tensor(n_ov))
    x = tensor(2, seq_len, d)
    expected = reference_queries_keys(x.double(), *(weight.double() for weight in weights))
    expected = (*expected, project_values(x.double(), *(weight.double() for weight in value_weights), n_qk))
    actual = project_queries_keys(x, *weights)
    assert len(actual) == 2  # v is projected where it is used (`project_values`), not next to q and k
    actual = (*actual, project_values(x, *value_weights, n_qk))
    tolerance = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-2, "atol": 5e-2}
    for result, reference in zip(actual, expected, strict=True):
        assert result.dtype == dtype and result.shape == reference.shape
        torch.testing.assert_close(result.double(), reference, **tolerance)
