"""The fast (sparse) path of a Lorsa layer equals the dense reference path: outputs, activations and every
gradient, with every backward route, in float32, float64 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf.configuration_lorsa import IMPLEMENTATIONS
from lorsa_hf.ops.paths import PATHS
from tests.ops.conftest import assert_same_path_results, lorsa_pair, requires_cuda, run_with_gradients


def test_every_implementation_the_config_accepts_has_a_path():
    assert sorted(PATHS) == sorted(IMPLEMENTATIONS)


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
@pytest.mark.parametrize("case", ["plain", "ties", "k_equals_n_ov"])
def test_sparse_equals_dense_outputs_activations_and_every_gradient(monkeypatch, activation, case, backward_from):
    monkeypatch.setattr("lorsa_hf.ops.attention.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    sparse, dense = lorsa_pair(activation, ties=case == "ties")
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    top_k = 128 if case == "k_equals_n_ov" else None
    out, grads = assert_same_path_results(sparse, dense, x, top_k=top_k)
    if case == "ties":
        scores = out.z.abs() if activation == "topk_abs" else out.z.relu()
        assert torch.equal(scores[..., 0::2], scores[..., 1::2])  # the selection really had to break ties
    if case == "k_equals_n_ov":
        assert out.top_k_indices.sort(-1).values.equal(torch.arange(128).expand(2, 12, 128))


@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
def test_gradient_reaches_w_o_only_in_selected_rows(activation):
    sparse, _ = lorsa_pair(activation, top_k=4)
    x = torch.randn(1, 3, 64)
    out, grads = run_with_gradients(sparse, x, torch.randn(1, 3, 64))
    selected = torch.zeros(128, dtype=torch.bool)
    selected[out.top_k_indices.flatten()] = True
    assert grads["layers.1.W_O"][~selected].abs().max() == 0
    assert grads["layers.1.W_O"][selected].abs().sum(-1).min() > 0


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
@pytest.mark.parametrize("frozen", ["everything", "W_V"])
def test_gradients_through_a_partly_frozen_lorsa_equal_the_reference(monkeypatch, backward_from, frozen):
    """Attribution through a frozen Lorsa (gradient for the input only) and a frozen W_V: whatever still wants a
    gradient gets the reference's."""
    monkeypatch.setattr("lorsa_hf.ops.attention.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    results = []
    for lorsa in lorsa_pair("topk_abs"):
        for name, parameter in lorsa.named_parameters():
            parameter.requires_grad_(frozen == "W_V" and not name.endswith("W_V"))
        x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = lorsa(x)
        (out.hidden_states.pow(2).sum() + out.top_k_values.abs().sum()).backward()
        results.append([x.grad] + [p.grad for p in lorsa.parameters() if p.requires_grad])
    assert len(results[0]) == (1 if frozen == "everything" else 8)
    for sparse_gradient, dense_gradient in zip(*results, strict=True):
        scale = dense_gradient.abs().max().item()
        torch.testing.assert_close(sparse_gradient, dense_gradient, atol=1e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
def test_sparse_equals_dense_over_several_attention_blocks(monkeypatch, backward_from):
    monkeypatch.setattr("lorsa_hf.ops.attention.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    monkeypatch.setattr("lorsa_hf.ops.blocks.ATTENTION_BLOCK_ROWS", 4)
    monkeypatch.setattr("lorsa_hf.ops.attention_backward.BACKWARD_CHUNK_ELEMENTS", 4 * 32 * 3)
    sparse, dense = lorsa_pair("topk_abs")
    x = torch.randn(2, 14, 64, generator=torch.Generator().manual_seed(0))
    assert_same_path_results(sparse, dense, x)


def _saved_for_backward(lorsa, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the floating-point tensors a training forward keeps for backward, other than parameters and the
    input."""
    shapes, excluded = [], {p.data_ptr() for p in lorsa.parameters()} | {x.data_ptr()}

    def pack(tensor):
        if tensor.data_ptr() not in excluded and tensor.is_floating_point():
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lorsa(x, output_activations=False)
    return shapes


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
def test_training_forward_keeps_no_attention_pattern_and_no_activations_of_every_head(monkeypatch, backward_from):
    """The sparse path keeps q, k, the [N, K] selection and v, or no v when its backward goes through x; the dense
    one also the [T, S] softmax pattern and [N, n_ov] activations (and v, in the layout its matmuls want)."""
    monkeypatch.setattr("lorsa_hf.ops.attention.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    monkeypatch.setattr("lorsa_hf.ops.blocks.ATTENTION_BLOCK_ROWS", 4)
    sparse, dense = lorsa_pair("topk_abs", n_ov_heads=512)
    x = torch.randn(2, 20, 64)
    tokens, n_ov, n_qk = 2 * 20, 512, 4

    def kept(shapes):
        return {
            "pattern": any(shape[-2:] == (20, 20) for shape in shapes),
            "activations": (tokens, n_ov) in shapes,
            "values": (2, n_qk, 20, n_ov // n_qk) in shapes,
        }

    assert kept(_saved_for_backward(sparse, x)) == {
        "pattern": False, "activations": False, "values": backward_from == "values"
    }
    saved_dense = kept(_saved_for_backward(dense, x))
    assert (saved_dense["pattern"], saved_dense["activations"]) == (True, True)


def test_sparse_equals_dense_with_the_fused_attention():
    sparse, dense = lorsa_pair("topk_relu")  # g = 32 = 2 d_qk: sequences longer than 64 take the fused kernel
    x = torch.randn(1, 80, 64, generator=torch.Generator().manual_seed(0))
    assert_same_path_results(sparse, dense, x)


def test_float64_paths_agree_to_float64_precision():
    sparse, dense = lorsa_pair("topk_abs", dtype=torch.float64)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    assert_same_path_results(sparse, dense, x, atol=1e-12, rtol=1e-10)


def test_bfloat16_autocast_is_close_to_float32_and_trains():
    sparse, dense = lorsa_pair("topk_abs", n_ov_heads=256, top_k=16)
    x = torch.randn(2, 32, 64)
    with torch.no_grad():
        reference = sparse(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse(x)
        dense_out = dense(x)
    # sharp random attention: bf16 logits move some heads across the TopK boundary (see docs/performance.md)
    same = (out.top_k_indices[..., :, None] == reference.top_k_indices[..., None, :]).any(-1).float().mean()
    assert same > 0.9
    for result in (out, dense_out):
        relative = (result.hidden_states.float() - reference.hidden_states).norm() / reference.hidden_states.norm()
        assert relative < 0.1
    out.hidden_states.float().pow(2).mean().backward()
    for name, parameter in sparse.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_bfloat16_autocast_backward_through_inputs_equals_through_values(monkeypatch):
    """Under bf16 autocast both backward routes of the projected values give the same gradients, to bf16 precision
    (float32 weights, bf16 products)."""
    sparse, _ = lorsa_pair("topk_abs", n_ov_heads=256, top_k=16)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    gradients = []
    for from_inputs in (True, False):
        monkeypatch.setattr("lorsa_hf.ops.attention.BACKWARD_FROM_INPUTS", from_inputs)
        sparse.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sparse(x)
        (out.hidden_states.float().pow(2).mean() + 0.1 * out.top_k_values.float().abs().mean()).backward()
        gradients.append({name: parameter.grad.clone() for name, parameter in sparse.named_parameters()})
    for name, through_inputs in gradients[0].items():
        through_values = gradients[1][name]
        assert through_inputs.dtype == torch.float32, name
        scale = through_values.abs().max().item()
        torch.testing.assert_close(through_inputs, through_values, atol=3e-2 * scale, rtol=0, msg=name)


def test_bfloat16_weights_without_autocast():
    sparse, dense = lorsa_pair("topk_relu", dtype=torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    out = sparse(x)
    out.hidden_states.float().sum().backward()
    assert out.hidden_states.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad.float()).all() for p in sparse.parameters())


@requires_cuda
@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
def test_cuda_sparse_equals_dense(activation):
    sparse, dense = lorsa_pair(activation, device="cuda")
    x = torch.randn(2, 12, 64, device="cuda")
    assert_same_path_results(sparse, dense, x, atol=1e-4, rtol=1e-3)
