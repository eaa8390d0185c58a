"""What a conversion did, per layer: printed by the CLI and written next to the converted checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

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
