"""Folding a foreign Lorsa's input conventions and scale factors into its weights, so that the layer takes the
Hugging Face attention input and returns the foreign layer's output in the original scale.

The foreign layer computes `ŷ = decode(encode(f_in * x')) / f_out` with `x' = (a - β) / γ` (the normalised
residual without the norm's gain γ and bias β; llamascopium) or `x' = a` (paper-era), where `a` is the Hugging
Face attention input. Every map from the input into q, k and v is affine, so

    W' = f_in * W / γ[:, None]        b' = b - f_in * (β / γ) @ W          (W_Q, W_K, W_V)
    W_O' = W_O / f_out                b_O' = b_O / f_out

reproduces it exactly while γ has no zeros. Head activations keep the foreign (normalised) units, and the
selection, which ranks `z * ||W_O||`, is unchanged by the uniform rescaling of W_O.
"""

from __future__ import annotations

import torch

from .foreign import CheckpointError, ForeignLorsa


def fold(
    lorsa: ForeignLorsa, gain: torch.Tensor | None, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The `LorsaLayer` state dict of `lorsa`, computed in float64 and cast to `dtype`.

    Args:
        gain, bias: The base model's input-norm gain γ and bias β (bias None for an RMSNorm); only used when the
            foreign input is the normalised residual.
    """
    t = {name: tensor.to(torch.float64) for name, tensor in lorsa.tensors.items()}
    f_in, f_out = lorsa.input_scale, lorsa.output_scale
    scale = torch.full((lorsa.d_model,), f_in, dtype=torch.float64)
    shift = torch.zeros(lorsa.d_model, dtype=torch.float64)
    if lorsa.input_is_normalized_residual:
        if gain is None:
            raise CheckpointError("This Lorsa was trained on the normalised residual: the input norm's gain is needed.")
        gain = gain.to(torch.float64)
        if tuple(gain.shape) != (lorsa.d_model,):
            raise CheckpointError(f"The input norm's gain has shape {tuple(gain.shape)}, expected ({lorsa.d_model},).")
        zeros = (gain == 0).nonzero().flatten().tolist()
        if zeros:
            raise CheckpointError(
                f"The base model's input norm in front of layer {lorsa.layer} has zero gain in dimensions "
                f"{zeros[:10]}{' ...' if len(zeros) > 10 else ''}: the normalised residual the Lorsa reads cannot be "
                "recovered from the attention input there, so it cannot be folded. Splice this Lorsa on the "
                "normalised residual yourself (run the norm without its gain) instead."
            )
        scale = scale / gain
        if bias is not None:
            shift = -bias.to(torch.float64) * scale  # f_in * (-β / γ): x' * f_in = a * scale + shift
    folded = {
        "W_Q": t["W_Q"] * scale[None, :, None],
        "b_Q": t["b_Q"] + torch.einsum("d,hdk->hk", shift, t["W_Q"]),
        "W_K": t["W_K"] * scale[None, :, None],
        "b_K": t["b_K"] + torch.einsum("d,hdk->hk", shift, t["W_K"]),
        "W_V": t["W_V"] * scale[None, :],
        "b_V": t["b_V"] + t["W_V"] @ shift,
        "W_O": t["W_O"] / f_out,
        "b_O": t["b_O"] / f_out,
    }
    if lorsa.use_qk_norm:
        folded["q_norm_weight"] = t["q_norm_weight"]
        folded["k_norm_weight"] = t["k_norm_weight"]
    return {name: tensor.to(dtype).contiguous() for name, tensor in folded.items()}
