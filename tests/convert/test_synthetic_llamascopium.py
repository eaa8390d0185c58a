"""Settings the fixtures do not exercise (per-head QK RMS norm, llama3 / NTK-by-parts rotary, adjacent pairs, a
stored attn_scale other than sqrt(d_qk), a layer other than 1), checked against a float64 reference written from
llamascopium's documented forward: `decode(encode(x * f_in)) / f_out` on the normalised residual."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from lorsa_hf import convert_checkpoint

from ..conftest import make_base
from ..reference import reference_lorsa

LAYER, D, N_QK, D_QK, N_OV, TOP_K, ROTARY = 2, 64, 8, 8, 128, 6, 8
NTK = dict(factor=8.0, low=1.0, high=4.0, old_context_len=16)
NORM_IN, NORM_OUT, EPS, ATTN_SCALE, N_CTX = 7.0, 5.0, 1e-5, 2.5, 32


def ntk_tables(n_ctx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) [n_ctx, ROTARY] as llamascopium stores them: NTK-by-parts frequencies, each one repeated for its
    adjacent pair."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, ROTARY, 2).double() / ROTARY))
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = NTK["old_context_len"] / NTK["low"], NTK["old_context_len"] / NTK["high"]
    scaled = torch.where(wavelen > low_wavelen, inv_freq / NTK["factor"], inv_freq)
    smooth = (NTK["old_context_len"] / wavelen - NTK["low"]) / (NTK["high"] - NTK["low"])
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    scaled = torch.where(medium, (1 - smooth) * scaled / NTK["factor"] + smooth * scaled, scaled)
    angles = torch.arange(n_ctx).double()[:, None] * scaled.repeat_interleave(2)[None, :]
    return angles.sin().float(), angles.cos().float()


def write_checkpoint(folder: Path, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A llamascopium Lorsa folder with every optional feature on; returns its weights under our names."""
    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    weights = {
        "W_Q": randn(N_QK, D, D_QK, scale=1.4 / D**0.5),
        "W_K": randn(N_QK, D, D_QK, scale=1.4 / D**0.5),
        "b_Q": randn(N_QK, D_QK, scale=0.3),
        "b_K": randn(N_QK, D_QK, scale=0.3),
        "W_V": randn(N_OV, D, scale=1 / D**0.5),
        "b_V": 0.1 + randn(N_OV, scale=0.3),
        "W_O": randn(N_OV, D, scale=3 / D**0.5) * torch.empty(N_OV, 1).uniform_(0.5, 2.0, generator=generator),
        "b_O": randn(D, scale=0.2),
        "q_norm_weight": 1 + randn(N_QK, D_QK, scale=0.3),
        "k_norm_weight": 1 + randn(N_QK, D_QK, scale=0.3),
    }
    hook_in, hook_out = f"blocks.{LAYER}.ln1.hook_normalized", f"blocks.{LAYER}.hook_attn_out"
    sin, cos = ntk_tables(N_CTX)
    stored = {
        **{name: weights[name] for name in ("W_Q", "W_K", "b_Q", "b_K", "W_V", "b_V", "W_O")},
        "b_D": weights["b_O"],
        "ln_q.w": weights["q_norm_weight"],
        "ln_k.w": weights["k_norm_weight"],
        f"dataset_average_activation_norm.{hook_in}": torch.tensor(NORM_IN),
        f"dataset_average_activation_norm.{hook_out}": torch.tensor(NORM_OUT),
        "rotary_sin": sin,
        "rotary_cos": cos,
        "mask": torch.ones(N_CTX, N_CTX, dtype=torch.bool).tril(),
        "IGNORE": torch.tensor(-torch.inf),
    }
    config = {
        "sae_type": "lorsa", "d_model": D, "expansion_factor": N_OV / D, "use_decoder_bias": True, "act_fn": "topk",
        "norm_activation": "dataset-wise", "sparsity_include_decoder_norm": True, "top_k": TOP_K,
        "hook_point_in": hook_in, "hook_point_out": hook_out, "n_qk_heads": N_QK, "d_qk_head": D_QK,
        "positional_embedding_type": "rotary", "rotary_dim": ROTARY, "rotary_base": 10000,
        "rotary_adjacent_pairs": True, "rotary_scale": 1, "use_NTK_by_parts_rope": True,
        "NTK_by_parts_factor": NTK["factor"], "NTK_by_parts_low_freq_factor": NTK["low"],
        "NTK_by_parts_high_freq_factor": NTK["high"], "old_context_len": NTK["old_context_len"], "n_ctx": N_CTX,
        "attn_scale": ATTN_SCALE, "use_post_qk_ln": True, "normalization_type": "RMS", "eps": EPS,
    }
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in stored.items()}, folder / "sae_weights.safetensors")
    return weights


def test_qk_norm_ntk_rotary_adjacent_pairs_and_dataset_norm(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(7)
    base = make_base("llama")
    weights = write_checkpoint(tmp_path / "lorsa", generator)
    conversion = convert_checkpoint(tmp_path / "lorsa", base)
    lorsa = conversion.lorsa
    config = lorsa.config
    assert (config.use_qk_norm, config.qk_norm_eps, config.rotary_adjacent_pairs) == (True, EPS, True)
    assert config.rope_parameters["rope_type"] == "llama3" and config.attn_scale == ATTN_SCALE

    seq = 20
    residual = torch.randn(2, seq, D, generator=generator) * 3
    norm = base.model.layers[LAYER].input_layernorm
    with torch.no_grad():
        attention_input = norm(residual)
        output = lorsa(attention_input, layer=LAYER, output_activations=True)

    # llamascopium: RMS-normalised residual without gain, scaled by f_in; output divided by f_out
    normalised = residual.double() / torch.sqrt(residual.double().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    f_in, f_out = math.sqrt(D) / NORM_IN, math.sqrt(D) / NORM_OUT
    sin, cos = ntk_tables(seq)
    cos = torch.cat([cos[:, 0::2], cos[:, 0::2]], dim=-1)[None].expand(2, -1, -1)
    sin = torch.cat([sin[:, 0::2], sin[:, 0::2]], dim=-1)[None].expand(2, -1, -1)
    reference_config = SimpleNamespace(
        n_qk_heads=N_QK, n_ov_heads=N_OV, top_k=TOP_K, use_qk_norm=True, qk_norm_eps=EPS, rotary_dim=ROTARY,
        rotary_adjacent_pairs=True, attn_scale=ATTN_SCALE, activation="topk_relu",
    )
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()[None].expand(2, -1, -1)
    expected, _, acts = reference_lorsa(normalised * f_in, weights, reference_config, cos, sin, causal)
    expected = expected / f_out

    torch.testing.assert_close(output.hidden_states.double(), expected, atol=1e-4, rtol=0)
    selected = torch.zeros_like(acts, dtype=torch.bool).scatter(-1, output.top_k_indices, True)
    assert torch.equal(selected, acts != 0)
    torch.testing.assert_close(output.activations().double(), acts, atol=1e-4, rtol=0)
