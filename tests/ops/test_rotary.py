"""`apply_rotary`: transformers' rotary embedding, as one autograd node that keeps the input's memory layout."""

import pytest
import torch
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb
from transformers.models.gptj.modeling_gptj import apply_rotary_pos_emb as gptj_apply_rotary_pos_emb

from lorsa_hf.ops.rotary import apply_rotary

BATCH, HEADS, SEQ, D_QK = 2, 3, 5, 8


def angles(rotary_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [B, T, r] in rotate-half layout, with other positions per sequence."""
    positions = torch.arange(SEQ, dtype=torch.float64)[None] + 7.0 * torch.arange(BATCH, dtype=torch.float64)[:, None]
    inv_freq = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    emb = (positions[..., None] * inv_freq).repeat(1, 1, 2)
    return emb.cos(), emb.sin()


def queries(seed: int = 0) -> torch.Tensor:
    """[B, H, T, d_qk] laid out [H, B, T, d_qk] in memory, as the fast projections return them."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(HEADS, BATCH, SEQ, D_QK, generator=generator, dtype=torch.float64).transpose(0, 1)


@pytest.mark.parametrize("rotary_dim", [4, D_QK])
def test_equals_transformers_rotate_half_and_keeps_the_memory_layout(rotary_dim):
    x = queries()
    cos, sin = angles(rotary_dim)
    out = apply_rotary(x, cos, sin)
    torch.testing.assert_close(out, apply_rotary_pos_emb(x, x, cos, sin)[0], rtol=0, atol=1e-15)
    assert out.stride() == x.stride()


def test_plain_ops_for_the_reference_path_give_the_same_rotation_and_gradient():
    cos, sin = angles(4)
    x = queries().requires_grad_()
    grad = torch.randn(BATCH, HEADS, SEQ, D_QK, dtype=torch.float64)
    results = []
    for one_node in (True, False):
        out = apply_rotary(x, cos, sin, one_node=one_node)
        results.append((out, *torch.autograd.grad(out, x, grad)))
    assert results[1][0].grad_fn.name() == "CatBackward0" and "Rotary" in results[0][0].grad_fn.name()
    for node, plain in zip(*results, strict=True):
        torch.testing.assert_close(node, plain, rtol=0, atol=1e-15)


@pytest.mark.parametrize("rotary_dim", [4, D_QK])
def test_adjacent_pairs_equal_transformers_gpt_j(rotary_dim):
    x = queries()
    cos, sin = angles(rotary_dim)
    half = rotary_dim // 2
    rotated = gptj_apply_rotary_pos_emb(x[..., :rotary_dim].transpose(1, 2), sin[..., :half], cos[..., :half])
    expected = torch.cat((rotated.transpose(1, 2), x[..., rotary_dim:]), dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin, adjacent_pairs=True), expected, rtol=0, atol=1e-15)


@pytest.mark.parametrize("adjacent_pairs", [False, True])
def test_gradient_is_exact_lands_in_the_input_layout_and_differentiates_again(adjacent_pairs):
    cos, sin = angles(4)
    x = queries().requires_grad_()

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin, adjacent_pairs)

    assert torch.autograd.gradcheck(rotate, (x,))
    assert torch.autograd.gradgradcheck(rotate, (x,))
    (grad,) = torch.autograd.grad(rotate(x), x, torch.randn(BATCH, HEADS, SEQ, D_QK, dtype=torch.float64))
    assert grad.stride() == x.stride()


def test_angles_that_require_grad_receive_it():
    x = queries()
    cos, sin = (angle.requires_grad_() for angle in angles(4))
    apply_rotary(x, cos, sin).sum().backward()
    cos_expected, sin_expected = (angle.detach().requires_grad_() for angle in (cos, sin))
    apply_rotary_pos_emb(x, x, cos_expected, sin_expected)[0].sum().backward()
    torch.testing.assert_close(cos.grad, cos_expected.grad)
    torch.testing.assert_close(sin.grad, sin_expected.grad)


def test_no_rotary_dims_is_the_identity():
    x = queries()
    cos, sin = angles(4)
    assert apply_rotary(x, cos[..., :0], sin[..., :0]) is x
