"""What a conversion did, per layer: printed by the CLI and written next to the converted checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .base_model import BaseModelInfo
from .foreign import ForeignLorsa

REPORT_FILE = "conversion_report.json"


@dataclass
class LayerReport:
    """One converted layer: where it came from, its geometry and selection, and every factor folded in."""

    layer: int
    source_format: str
    source: str
    n_ov_heads: int
    n_qk_heads: int
    d_qk_head: int
    top_k: int
    activation: str
    attn_scale: float
    rotary: str
    qk_norm: str
    input_norm_folded: str
    dataset_norm: str
    input_scale: float
    output_scale: float
    notes: list[str] = field(default_factory=list)


@dataclass
class ConversionReport:
    """All converted layers, and the base model they were folded against."""

    base_model: str | None
    base_model_type: str
    layers: list[LayerReport]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def __str__(self) -> str:
        base = f"{self.base_model or 'the base model'} ({self.base_model_type})"
        lines = [f"Converted {len(self.layers)} Lorsa layer(s) for {base}:"]
        for entry in self.layers:
            lines += [
                f"  layer {entry.layer}: {entry.source_format} checkpoint {entry.source}",
                f"    heads {entry.n_ov_heads} in {entry.n_qk_heads} QK groups of d_qk {entry.d_qk_head}, "
                f"K {entry.top_k}, {entry.activation}, attn_scale {entry.attn_scale:.6g}",
                f"    rotary: {entry.rotary}; q/k norm: {entry.qk_norm}",
                f"    input norm: {entry.input_norm_folded}",
                f"    dataset norm: {entry.dataset_norm}",
                f"    folded factors: input x {entry.input_scale:.6g}, output / {entry.output_scale:.6g}",
            ]
            lines += [f"    note: {note}" for note in entry.notes]
        return "\n".join(lines)


def _describe_rotary(lorsa: ForeignLorsa) -> str:
    if lorsa.rotary_dim == 0:
        return "none"
    rope = lorsa.rope_parameters
    pairs = "adjacent pairs" if lorsa.rotary_adjacent_pairs else "rotate-half pairs"
    described = f"{lorsa.rotary_dim} dims, {pairs}, {rope['rope_type']} theta {rope['rope_theta']:g}"
    if rope["rope_type"] == "llama3":
        described += (
            f" (factor {rope['factor']}, low {rope['low_freq_factor']}, high {rope['high_freq_factor']}, "
            f"original context {rope['original_max_position_embeddings']})"
        )
    return described


def layer_report(lorsa: ForeignLorsa, base: BaseModelInfo, source: str) -> LayerReport:
    """The report of one foreign layer folded against `base`, read from `source` (as the user named it)."""
    if not lorsa.input_is_normalized_residual:
        input_norm = "not folded (the checkpoint was trained on the attention input itself)"
    elif base.norms[lorsa.layer][1] is not None:
        input_norm = "LayerNorm gain and bias folded into W_Q, W_K, W_V and their biases"
    else:
        input_norm = "RMSNorm gain folded into W_Q, W_K, W_V"
    return LayerReport(
        layer=lorsa.layer,
        source_format=lorsa.format,
        source=source,
        n_ov_heads=lorsa.n_ov_heads,
        n_qk_heads=lorsa.n_qk_heads,
        d_qk_head=lorsa.d_qk_head,
        top_k=lorsa.top_k,
        activation=lorsa.activation,
        attn_scale=lorsa.attn_scale,
        rotary=_describe_rotary(lorsa),
        qk_norm=f"per-group RMS norm, eps {lorsa.qk_norm_eps:g}" if lorsa.use_qk_norm else "none",
        input_norm_folded=input_norm,
        dataset_norm=lorsa.dataset_norm,
        input_scale=lorsa.input_scale,
        output_scale=lorsa.output_scale,
        notes=list(lorsa.notes),
    )
