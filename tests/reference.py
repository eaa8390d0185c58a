"""A dense float64 Lorsa written straight from docs/method.md §1, independent of the package's code."""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, adjacent_pairs: bool = False) -> torch.Tensor:
    """Rotary on the first r = cos.shape[-1] dims of x [B, T, d_qk]; cos/sin [B, T, r] as transformers lays them
    out (the r/2 frequencies repeated twice)."""
    r = cos.shape[-1]
    out = x.clone()
    half = r // 2
    for j in range(half):
        c, s = cos[..., j], sin[..., j]
        a, b = (2 * j, 2 * j + 1) if adjacent_pairs else (j, j + half)
        out[..., a] = x[..., a] * c - x[..., b] * s
        out[..., b] = x[..., b] * c + x[..., a] * s
    return out


def reference_lorsa(
    x: torch.Tensor,
    params: dict[str, torch.Tensor],
    config,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    allowed: torch.Tensor,
    top_k: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, T, d]; allowed [B, T, T] boolean (query s may read key t). Returns (output, z, a), all float64."""
    p = {name: value.detach().double() for name, value in params.items()}
    x = x.double()
    batch, seq, _ = x.shape
    n_qk, g, k = config.n_qk_heads, config.n_ov_heads // config.n_qk_heads, top_k or config.top_k
    v = x @ p["W_V"].T + p["b_V"]  # [B, T, n_ov]: one scalar value per head and token
    z = torch.zeros(batch, seq, config.n_ov_heads, dtype=torch.float64)
    for h in range(n_qk):
        q = x @ p["W_Q"][h] + p["b_Q"][h]
        key = x @ p["W_K"][h] + p["b_K"][h]
        if config.use_qk_norm:
            q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + config.qk_norm_eps) * p["q_norm_weight"][h]
            key = key / torch.sqrt(key.pow(2).mean(-1, keepdim=True) + config.qk_norm_eps) * p["k_norm_weight"][h]
        if config.rotary_dim:
            q = rotate(q, cos.double(), sin.double(), config.rotary_adjacent_pairs)
            key = rotate(key, cos.double(), sin.double(), config.rotary_adjacent_pairs)
        logits = q @ key.transpose(1, 2) / config.attn_scale
        logits = logits.masked_fill(~allowed, float("-inf"))
        pattern = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        z[..., h * g : (h + 1) * g] = pattern @ v[..., h * g : (h + 1) * g]
    decoder_norms = p["W_O"].norm(dim=-1)
    score = (z.abs() if config.activation == "topk_abs" else z.clamp(min=0)) * decoder_norms
    selected = torch.zeros_like(z, dtype=torch.bool).scatter(-1, score.argsort(dim=-1, descending=True)[..., :k], True)
    a = torch.where(selected, z if config.activation == "topk_abs" else z.clamp(min=0), torch.zeros_like(z))
    return a @ p["W_O"] + p["b_O"], z, a
