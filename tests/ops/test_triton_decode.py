"""The Triton decode kernel, run on CPU through Triton's interpreter."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

_INTERPRETED_KERNEL = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from lorsa_hf.ops.triton_decode import triton_sparse_decode

    torch.manual_seed(0)
    for n_ov, d, tokens, top_k in ((3000, 300, 7, 45), (128, 64, 5, 128), (50, 17, 3, 1)):
        W_O = torch.randn(n_ov, d)
        indices = torch.randint(0, n_ov, (tokens, top_k))
        values = torch.randn(tokens, top_k)
        expected = F.embedding_bag(indices, W_O, per_sample_weights=values, mode="sum")
        torch.testing.assert_close(triton_sparse_decode(values, indices, W_O), expected, atol=1e-4, rtol=1e-4)
    W_O = torch.randn(64, 200)[:, :100]
    indices, values = torch.randint(0, 64, (4, 8)), torch.randn(4, 8)
    expected = F.embedding_bag(indices, W_O.contiguous(), per_sample_weights=values, mode="sum")
    torch.testing.assert_close(triton_sparse_decode(values, indices, W_O), expected, atol=1e-4, rtol=1e-4)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter_equals_embedding_bag():
    """The kernel's logic on CPU through Triton's interpreter (TRITON_INTERPRET=1), where no GPU is present."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
