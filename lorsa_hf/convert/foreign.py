"""What the readers of foreign Lorsa checkpoints produce: the stored tensors in our layout plus every convention
needed to fold them into a layer that takes the Hugging Face attention input."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..rotary_embedding import LorsaRotaryEmbedding


class CheckpointError(ValueError):
    """A foreign Lorsa checkpoint that cannot be converted; the message names the problem and the fix."""


@dataclass
class ForeignLorsa:
    """One Lorsa layer as a foreign implementation stored it.

    Tensors use our layout and names (W_Q, W_K [n_qk, d, d_qk]; b_Q, b_K [n_qk, d_qk]; W_V, W_O [n_ov, d];
    b_V [n_ov]; b_O [d]; optional q_norm_weight, k_norm_weight [n_qk, d_qk]) but hold the stored values, before
    any folding. The layer computes `decode(encode(x * input_scale)) / output_scale` where `x` is the Hugging Face
    attention input when `input_is_normalized_residual` is False, and `(x - bias) / gain` of the base model's
    input norm when it is True (TransformerLens' `ln1.hook_normalized`).
    """

    format: str
    path: Path
    layer: int | None
    d_model: int
    n_ov_heads: int
    n_qk_heads: int
    d_qk_head: int
    top_k: int
    activation: str
    attn_scale: float
    rotary_dim: int
    rotary_adjacent_pairs: bool
    rope_parameters: dict[str, Any]
    use_qk_norm: bool
    qk_norm_eps: float
    tensors: dict[str, torch.Tensor]
    input_is_normalized_residual: bool
    input_scale: float = 1.0
    output_scale: float = 1.0
    dataset_norm: str = "none recorded"
    model_name: str | None = None
    notes: list[str] = field(default_factory=list)


def read_json_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, with a clear error when it is missing, unreadable or not a JSON object."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(
            f"{path} has no config.json; point to the folder that holds the checkpoint's config.json."
        )
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); the file is corrupt or truncated.") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} holds a JSON {type(config).__name__}, not the object a Lorsa config is.")
    return config


def require(config: dict[str, Any], key: str, kind: type | tuple[type, ...], source: Path) -> Any:
    """`config[key]`, which must exist and be of `kind` (bools are not ints)."""
    if key not in config or config[key] is None:
        raise CheckpointError(f"{source}/config.json lacks {key!r}; the checkpoint is incomplete or not a Lorsa.")
    value = config[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise CheckpointError(
            f"{source}/config.json: {key!r} is {value!r}, expected {'/'.join(k.__name__ for k in kinds)}."
        )
    return value


def rope_parameters_from(config: dict[str, Any], source: Path) -> dict[str, Any]:
    """Rotary frequencies in the transformers format from the TransformerLens-style fields both formats store
    (`rotary_base`, `use_NTK_by_parts_rope` and its factors, which is transformers' `llama3` rope type)."""
    theta = float(require(config, "rotary_base", (int, float), source))
    if not config.get("use_NTK_by_parts_rope"):
        return {"rope_type": "default", "rope_theta": theta}
    values = {}
    for ours, theirs in (
        ("factor", "NTK_by_parts_factor"),
        ("low_freq_factor", "NTK_by_parts_low_freq_factor"),
        ("high_freq_factor", "NTK_by_parts_high_freq_factor"),
        ("original_max_position_embeddings", "old_context_len"),
    ):
        values[ours] = require(config, theirs, (int, float), source)
    if values["low_freq_factor"] >= values["high_freq_factor"]:
        raise CheckpointError(
            f"{source}/config.json: NTK_by_parts_low_freq_factor ({values['low_freq_factor']}) must be below "
            f"NTK_by_parts_high_freq_factor ({values['high_freq_factor']}) for llama3 rotary scaling."
        )
    values["original_max_position_embeddings"] = int(values["original_max_position_embeddings"])
    return {"rope_type": "llama3", "rope_theta": theta, **values}


def rotary_settings(config: dict[str, Any], d_qk_head: int, source: Path) -> tuple[int, bool, dict[str, Any]]:
    """(rotary_dim, adjacent_pairs, rope_parameters); refuses what our layer cannot reproduce."""
    kind = config.get("positional_embedding_type", "rotary")
    if kind in ("none", None):
        return 0, False, {"rope_type": "default", "rope_theta": 10000.0}
    if kind != "rotary":
        raise CheckpointError(
            f"{source}/config.json: positional_embedding_type {kind!r} is not supported (rotary or none)."
        )
    if config.get("rotary_scale", 1) != 1:
        raise CheckpointError(
            f"{source}/config.json: rotary_scale {config['rotary_scale']} (q/k dims repeated before rotary) is not "
            "supported; only rotary_scale 1 checkpoints can be converted."
        )
    rotary_dim = require(config, "rotary_dim", int, source)
    if not 0 <= rotary_dim <= d_qk_head or rotary_dim % 2:
        raise CheckpointError(
            f"{source}/config.json: rotary_dim {rotary_dim} must be even and at most d_qk_head ({d_qk_head})."
        )
    adjacent = config.get("rotary_adjacent_pairs")
    if not isinstance(adjacent, bool):
        raise CheckpointError(f"{source}/config.json: rotary_adjacent_pairs must be true or false, got {adjacent!r}.")
    return rotary_dim, adjacent, rope_parameters_from(config, source)


def check_rotary_buffers(lorsa: ForeignLorsa, sin: torch.Tensor | None, cos: torch.Tensor | None) -> None:
    """The stored `rotary_sin`/`rotary_cos` buffers are what the foreign forward used: refuse the checkpoint when
    the rotary settings we read from its config give different numbers (wrong base, pairing or scaling)."""
    if lorsa.rotary_dim == 0 or sin is None or cos is None:
        return
    n_ctx = min(sin.shape[0], 256)
    if sin.shape != cos.shape or sin.dim() != 2 or sin.shape[1] != lorsa.rotary_dim:
        raise CheckpointError(
            f"{lorsa.path}: rotary buffers have shape {tuple(sin.shape)}/{tuple(cos.shape)}, expected "
            f"[n_ctx, {lorsa.rotary_dim}] for rotary_dim {lorsa.rotary_dim}; the weights do not match the config."
        )
    max_positions = max(n_ctx, int(lorsa.rope_parameters.get("original_max_position_embeddings", 1)) + 1)
    rotary = LorsaRotaryEmbedding(lorsa.rotary_dim, lorsa.rope_parameters, max_positions)
    ours_cos, ours_sin = rotary(torch.zeros((), dtype=torch.float64), torch.arange(n_ctx)[None])
    ours_cos, ours_sin = ours_cos[0], ours_sin[0]
    if lorsa.rotary_adjacent_pairs:
        half = lorsa.rotary_dim // 2
        ours_cos = ours_cos[:, :half].repeat_interleave(2, dim=-1)
        ours_sin = ours_sin[:, :half].repeat_interleave(2, dim=-1)
    error = max(
        (ours_cos - cos[:n_ctx].double()).abs().max().item(), (ours_sin - sin[:n_ctx].double()).abs().max().item()
    )
    if not error < 5e-3:
        raise CheckpointError(
            f"{lorsa.path}: the stored rotary tables differ (max {error:.3g}) from the rotary settings in its "
            f"config.json ({lorsa.rope_parameters}, rotary_dim {lorsa.rotary_dim}, adjacent pairs "
            f"{lorsa.rotary_adjacent_pairs}); config and weights do not belong together."
        )


def check_shapes(lorsa: ForeignLorsa) -> None:
    """Every tensor has the shape the config implies, and is finite."""
    d, n_qk, d_qk, n_ov = lorsa.d_model, lorsa.n_qk_heads, lorsa.d_qk_head, lorsa.n_ov_heads
    expected = {
        "W_Q": (n_qk, d, d_qk),
        "b_Q": (n_qk, d_qk),
        "W_K": (n_qk, d, d_qk),
        "b_K": (n_qk, d_qk),
        "W_V": (n_ov, d),
        "b_V": (n_ov,),
        "W_O": (n_ov, d),
        "b_O": (d,),
    }
    if lorsa.use_qk_norm:
        expected.update(q_norm_weight=(n_qk, d_qk), k_norm_weight=(n_qk, d_qk))
    for name, shape in expected.items():
        tensor = lorsa.tensors[name]
        if tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{lorsa.path}: {name} has shape {tuple(tensor.shape)} but its config (d_model {d}, {n_ov} heads in "
                f"{n_qk} QK groups of d_qk {d_qk}) implies {shape}; config and weights do not belong together."
            )
        if not tensor.is_floating_point():
            raise CheckpointError(f"{lorsa.path}: {name} has dtype {tensor.dtype}, expected a floating-point tensor.")
        if not torch.isfinite(tensor).all():
            raise CheckpointError(f"{lorsa.path}: {name} contains NaN or infinite values; the checkpoint is corrupt.")
    if n_ov % n_qk:
        raise CheckpointError(f"{lorsa.path}: {n_ov} heads cannot be split evenly into {n_qk} QK groups.")
    if not 0 < lorsa.top_k <= n_ov:
        raise CheckpointError(f"{lorsa.path}: top_k {lorsa.top_k} must be between 1 and the number of heads ({n_ov}).")
    if not (lorsa.attn_scale > 0 and math.isfinite(lorsa.attn_scale)):
        raise CheckpointError(f"{lorsa.path}: attn_scale {lorsa.attn_scale} must be a positive number.")
