"""A Lorsa's model card (README.md of its Hub repo), filled from an eval run's `results.json`."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .report import _json_ready, _number, _table, load_results


def _front_matter(results: dict[str, Any], license: str | None, tags: Sequence[str]) -> str:
    base = results["lorsa"].get("base_model_name_or_path") or results["base_model"].get("name_or_path")
    lines = ["---", "library_name: lorsa_hf"]
    if license:
        lines.append(f"license: {license}")
    if base:
        lines.append(f"base_model: {json.dumps(base)}")
    lines.append("tags:")
    lines += [f"- {tag}" for tag in ("lorsa", "interpretability", "sparse-dictionary-learning", *tags)]
    lines.append("---")
    return "\n".join(lines)


def model_card(
    results: dict[str, Any] | str | os.PathLike,
    repo_id: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
) -> str:
    """The model card text for the Lorsa evaluated in `results` (a dict or a `results.json` path)."""
    if not isinstance(results, dict):
        results = load_results(results)
    results = _json_ready(results)
    lorsa, base, data = results["lorsa"], results["base_model"], results["data"]
    base_name = lorsa.get("base_model_name_or_path") or base.get("name_or_path")
    layers = ", ".join(map(str, lorsa["layers"]))
    repo = repo_id or "path/to/this/lorsa"
    out = [
        _front_matter(results, license, tags),
        "",
        f"# Lorsa for {base_name}, layer{'s' if len(lorsa['layers']) > 1 else ''} {layers}",
        "",
        "Low-Rank Sparse Attention (Lorsa, arXiv 2504.20938) replacing the attention block(s) above: "
        f"{lorsa['n_ov_heads']:,} heads with one-dimensional OV circuits in {lorsa['n_qk_heads']} QK groups of "
        f"d_qk {lorsa['d_qk_head']}; per token the top {lorsa['top_k']} heads are kept ({lorsa['activation']}).",
        "",
        "## Use",
        "",
        "```python",
        "from lorsa_hf import load_spliced",
        "",
        f"model = load_spliced({json.dumps(base_name)}, {json.dumps(repo)})  # the base model, Lorsa in place",
        "```",
        "",
        "## Evaluation",
        "",
        f"On {data['n_counted_tokens']:,} held-out tokens ({data['source']}), BOS and padding excluded; "
        f"mean ablation uses a separate {data['n_mean_tokens']:,} tokens. Seed {results['seed']}.",
        "",
    ]
    rows = []
    for layer, m in results["reconstruction"].items():
        spliced = results["downstream"]["layer_sets"].get(layer, {})
        rows.append(
            [
                layer, _number(m["fvu"]), _number(m.get("l0"), 2), _number(m.get("dead_fraction")),
                _number(spliced.get("loss_recovered_zero")), _number(spliced.get("loss_recovered_mean")),
                _number(spliced.get("kl_spliced")), _number(spliced.get("ce_increase")),
            ]
        )
    everything = results["downstream"]["layer_sets"].get("all")
    if everything:
        rows.append(
            [
                "all", "–", "–", "–", _number(everything["loss_recovered_zero"]),
                _number(everything["loss_recovered_mean"]), _number(everything["kl_spliced"]),
                _number(everything["ce_increase"]),
            ]
        )
    out.append(
        _table(
            ["layer", "FVU", "L0", "dead fraction", "loss rec. (zero)", "loss rec. (mean)", "KL", "ΔCE"], rows
        )
    )
    out += ["", f"Clean CE: {_number(results['downstream']['ce_clean'])} nats/token.", ""]
    if results.get("lm_eval"):
        rows = [
            [
                task, metric, _number(m["clean"]), _number(m["spliced"]),
                f"{_number(m['delta'])} ± {_number(m['delta_stderr'])}",
            ]
            for task, metrics in results["lm_eval"]["tasks"].items()
            for metric, m in metrics.items()
        ]
        out += ["lm-eval, all layers spliced:", "", _table(["task", "metric", "clean", "spliced", "Δ"], rows), ""]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    out += [f"Evaluated with `lorsa-hf eval` ({versions}) on {results['created']}.", ""]
    return "\n".join(out)


def write_model_card(
    results: dict[str, Any] | str | os.PathLike, path: str | os.PathLike, **kwargs: Any
) -> Path:
    """Write `model_card(results, **kwargs)` to `path` atomically and return the path."""
    atomic_write_text(path, model_card(results, **kwargs))
    return Path(path)


__all__ = ["model_card", "write_model_card"]
