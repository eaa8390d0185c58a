"""Rotary position embeddings applied to Lorsa queries and keys, given the angles `(cos, sin)`.

Where the angles come from (the base model's rotary module, or the Lorsa's own) is not this
module's concern: it only rotates, in the rotate-half or the adjacent-pairs layout.
"""

from __future__ import annotations

import torch


def _rotated(x_rot: torch.Tensor, adjacent_pairs: bool) -> torch.Tensor:
    """The rotary's quarter turn of each pair: (a, b) -> (-b, a)."""
    if adjacent_pairs:
        return torch.stack((-x_rot[..., 1::2], x_rot[..., 0::2]), dim=-1).flatten(-2)
    half = x_rot.shape[-1] // 2
    return torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent_pairs: bool) -> torch.Tensor:
    """x with its first r dims rotated by the angles of cos/sin [B, 1, T, r] (in the pairing's layout), in
    plain differentiable ops."""
    rotary_dim = cos.shape[-1]
    x_rot = x[..., :rotary_dim]
    return torch.cat((x_rot * cos + _rotated(x_rot, adjacent_pairs) * sin, x[..., rotary_dim:]), dim=-1)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent_pairs: bool):
    """`_rotate` written into `out`, which may be a strided view and of another dtype than x (the arithmetic
    runs in the promoted one). When x takes part in a graph (a double backward), `_rotate` itself."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _rotate(x, cos, sin, adjacent_pairs)
    rotary_dim = cos.shape[-1]
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    x_rot, target = x[..., :rotary_dim], out[..., :rotary_dim]
    torch.mul(x_rot, cos, out=target)
    target.addcmul_(_rotated(x_rot, adjacent_pairs), sin)
    return out


class _Rotary(torch.autograd.Function):
    """The rotary embedding as one autograd node. Autograd through slices and a concatenation would fill and
    copy the full [B, H, T, d_qk] gradient several times and hand it back in a new layout; this backward
    rotates the gradient back (the transpose of a rotation is the rotation by -angle) straight into the memory
    layout of the input, which for the projections' output is the one their matmul backward reads. Under
    `create_graph` the backward runs as plain differentiable ops, so double backward works."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent_pairs: bool) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        # the input's layout (as empty_like would give it), without keeping the input itself alive
        ctx.adjacent_pairs, ctx.like = adjacent_pairs, torch.empty_like(x, device="meta")
        out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, cos.dtype))
        return _rotate_into(out, x, cos, sin, adjacent_pairs)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        cos, sin = ctx.saved_tensors
        grad_input = torch.empty_like(ctx.like, device=grad_output.device)
        return _rotate_into(grad_input, grad_output, cos, -sin, ctx.adjacent_pairs), None, None, None


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent_pairs: bool = False, one_node: bool = True
) -> torch.Tensor:
    """Rotate the first `cos.shape[-1]` dims of `x` [B, H, T, d_qk]; `cos`/`sin` [B, T, r] in rotate-half layout.

    `adjacent_pairs=False` pairs dim i with i + r/2 (GPT-NeoX, Llama); `True` pairs 2i with 2i + 1 (GPT-J).
    With `one_node` (the fast path) the rotation is one autograd node and keeps the memory layout of `x`;
    without it (the dense reference path) it is plain differentiable ops, as the reference implementations
    write it, which also suits torch.func transforms.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == 0:
        return x
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    if adjacent_pairs:  # the angle of pair i sits at dims 2i and 2i + 1
        cos = cos[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
        sin = sin[..., : rotary_dim // 2].repeat_interleave(2, dim=-1)
    # trained angles: plain autograd reaches them; under torch.compile the compiler fuses the plain ops itself
    # (and cannot trace the `out=` writes into a strided view)
    if not one_node or cos.requires_grad or sin.requires_grad or torch.compiler.is_compiling():
        return _rotate(x, cos, sin, adjacent_pairs)
    return _Rotary.apply(x, cos, sin, adjacent_pairs)
