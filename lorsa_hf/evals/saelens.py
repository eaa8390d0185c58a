"""The headline metrics under the names SAELens uses, so that a Lorsa's `results.json` can be read next to the
numbers published for SAEs. Each is one of this package's own metrics, renamed or combined (docs/evals.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SAELENS_METRICS = {
    "explained_variance": "1 − FVU: the target's variance around its mean that the replacement explains (↑, 1 best)",
    "l0": "mean number of active heads per token (↓ is sparser; a TopK Lorsa has L0 ≤ top_k)",
    "ce_loss_score": "loss recovered against zero ablation: (CE_zero − CE_spliced) / (CE_zero − CE_clean) (↑, 1 best)",
    "kl_div_score": "(KL_zero − KL_spliced) / KL_zero, KL(clean ‖ ·) per token (↑, 1 best)",
    "l2_ratio": "mean ‖ŷ‖ / ‖y‖ per token (→ 1; below 1 is shrinkage)",
    "cossim": "mean cosine similarity of ŷ and y per token (↑, 1 best)",
}
"""SAELens name -> what it is here and which way it should move."""

RECONSTRUCTION_SOURCES = {
    "explained_variance": "explained_variance", "l0": "l0", "l2_ratio": "relative_norm", "cossim": "cosine_similarity",
}
"""SAELens name -> the reconstruction metric (`reconstruction_metrics`) it is."""
_DOWNSTREAM = ("ce_loss_score", "kl_div_score")


def kl_div_score(kl_spliced: float | None, kl_zero: float | None) -> float | None:
    """(KL_zero − KL_spliced) / KL_zero: 1 when splicing leaves the next-token distribution unchanged."""
    if kl_spliced is None or not kl_zero:
        return None
    return (kl_zero - kl_spliced) / kl_zero


def saelens_metrics(reconstruction: Mapping[str, Any], downstream: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """`{layer set: {SAELens name: value}}` from the reconstruction (by layer) and downstream (by layer set)
    results of `evaluate_lorsa`; the all-layers set has only the two downstream scores."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in downstream["layer_sets"].items():
        metrics = reconstruction.get(name, {})
        values = {key: metrics.get(source) for key, source in RECONSTRUCTION_SOURCES.items()}
        values["ce_loss_score"] = entry.get("loss_recovered_zero")
        values["kl_div_score"] = kl_div_score(entry.get("kl_spliced"), entry.get("kl_zero"))
        out[name] = {key: values[key] for key in SAELENS_METRICS if name != "all" or key in _DOWNSTREAM}
    return out


__all__ = ["SAELENS_METRICS", "kl_div_score", "saelens_metrics"]
