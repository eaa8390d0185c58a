"""The TopK selection: which heads a token keeps, ranked by |z| (or relu(z)) times the decoder norm ||W_O[i]||.

Public inside the package: the fast attention selects in its own autograd node with these functions, the
dense reference after its attention, and the trainer's auxiliary loss among dead heads.
"""

from __future__ import annotations

import torch


def decoder_norms(W_O: torch.Tensor) -> torch.Tensor:
    """||W_O[i]|| [n_ov], without gradient (they only rank heads). Outside training (no gradient wanted for W_O)
    the result is kept on W_O and reused until W_O changes (a new tensor, or an in-place change, which bumps its
    version): a decode step then reads no more than K rows of W_O. An in-place change through `W_O.data` is
    invisible to PyTorch's version counter; after one, `del W_O.lorsa_decoder_norms` drops the kept norms. Under
    torch.compile they are computed in the graph (it cannot trace reading a data pointer)."""
    training = torch.is_grad_enabled() and W_O.requires_grad
    with torch.no_grad():
        if training or torch.compiler.is_compiling():
            return W_O.norm(dim=-1)
        key = (W_O.data_ptr(), W_O._version, W_O.dtype)
        cached = getattr(W_O, "lorsa_decoder_norms", None)
        if cached is None or cached[0] != key:
            cached = (key, W_O.norm(dim=-1))
            W_O.lorsa_decoder_norms = cached
        return cached[1]


@torch.no_grad()
def select_top_k(
    z: torch.Tensor, decoder_norms: torch.Tensor, top_k: int, activation: str, among: torch.Tensor | None = None
) -> torch.Tensor:
    """Indices [N, K] of the K heads with the largest score |z| ||W_O|| ("topk_abs") or relu(z) ||W_O||;
    with `among` (boolean [n_ov]) only those heads compete (the auxiliary loss picks among dead heads)."""
    scores = z.abs() if activation == "topk_abs" else z.relu()
    scores = scores.to(torch.promote_types(z.dtype, decoder_norms.dtype)).mul_(decoder_norms)
    if among is not None:
        scores = scores.masked_fill_(~among, -1.0)
    return scores.topk(top_k, dim=-1, sorted=False).indices


def kept_activations(z: torch.Tensor, indices: torch.Tensor, activation: str) -> torch.Tensor:
    """The activations a at the selected heads [N, K]: signed z ("topk_abs") or relu(z) ("topk_relu")."""
    values = z.gather(-1, indices)
    return values.relu() if activation == "topk_relu" else values


def select_from_groups(
    z: torch.Tensor, norms: torch.Tensor, top_k: int, activation: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z per QK group [B, n_qk, T, g] -> (z [N, n_ov] with head i = group * g + j, the kept activations [N, K],
    differentiable through a gather, and their heads [N, K])."""
    z = z.transpose(1, 2).reshape(-1, norms.shape[0])
    indices = select_top_k(z, norms, top_k, activation)
    return z, kept_activations(z, indices, activation), indices
