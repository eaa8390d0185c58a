"""A sparse and a dense copy of the same random Lorsa, and the check that both paths give the same results."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import make_base, make_lorsa

LAYER = 1
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def lorsa_pair(activation: str, ties: bool = False, device: str = "cpu", **overrides):
    """A sparse and a dense copy of the same random Lorsa (tiny Llama base, d 64, n_qk 4, n_ov 128)."""
    values = dict(n_ov_heads=128, top_k=8, activation=activation)
    values.update(overrides)
    sparse = make_lorsa(make_base("llama").config, [LAYER], **values)
    if ties:  # heads 2j and 2j + 1 identical: equal z, equal decoder norms, so every score is tied in pairs
        with torch.no_grad():
            layer = sparse.layer(LAYER)
            for name in ("W_V", "W_O", "b_V"):
                getattr(layer, name)[1::2] = getattr(layer, name)[0::2]
    dense = copy.deepcopy(sparse)
    dense.config.implementation = "dense"
    return sparse.to(device), dense.to(device)


def run_with_gradients(lorsa, x: torch.Tensor, grad: torch.Tensor, top_k: int | None = None):
    """Forward with activations, a loss on the output and on the kept activations, and every gradient: of each
    parameter and of the input (as attribution through a spliced model needs)."""
    lorsa.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = lorsa(x, top_k=top_k)
    loss = (out.hidden_states * grad).sum() + 0.1 * out.top_k_values.abs().sum()
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in lorsa.named_parameters()}
    gradients["input"] = x.grad
    return out, gradients


def assert_same_path_results(sparse, dense, x, top_k=None, atol=1e-5, rtol=1e-4):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    out_s, grads_s = run_with_gradients(sparse, x, grad, top_k)
    out_d, grads_d = run_with_gradients(dense, x, grad, top_k)
    torch.testing.assert_close(out_s.z, out_d.z, atol=atol, rtol=rtol)
    heads_s, order_s = out_s.top_k_indices.sort(-1)
    heads_d, order_d = out_d.top_k_indices.sort(-1)
    assert torch.equal(heads_s, heads_d)  # the same heads selected for every token
    values_s, values_d = out_s.top_k_values.gather(-1, order_s), out_d.top_k_values.gather(-1, order_d)
    torch.testing.assert_close(values_s, values_d, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_s.activations(), out_d.activations(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out_s.hidden_states, out_d.hidden_states, atol=atol, rtol=rtol)
    assert grads_s.keys() == grads_d.keys()
    for name in grads_s:  # float32 rounding differs between the two decodes: tolerance scaled by the gradient
        scale = grads_d[name].abs().max().item()
        message = f"gradient of {name}"
        torch.testing.assert_close(grads_s[name], grads_d[name], atol=atol * scale, rtol=rtol, msg=message)
    return out_s, grads_s
