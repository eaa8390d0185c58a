"""A sweep's summary: `sweep.json` (every configuration, its settings and final metrics), `sweep.md` (the same
as a table) and the plots, rewritten from the configurations' folders whenever one finishes.

Processes of a launch rewrite it under a file lock, so the last writer has seen every finished run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..io import atomic_write_text
from .grid import D_QK, N_OV, N_QK, lorsa_value, qk_parameters
from .plan import SweepPlan

METRICS = ("heldout/fvu", "heldout/l0", "heldout/dead_fraction", "train/loss", "tokens")
HEADINGS = {"heldout/fvu": "FVU", "heldout/l0": "L0", "heldout/dead_fraction": "dead", "train/loss": "loss",
            "tokens": "tokens"}


@contextlib.contextmanager
def summary_lock(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".summary.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def collect(plan: SweepPlan) -> list[dict[str, Any]]:
    """One row per configuration: settings, status, metrics and time."""
    rows = []
    for configuration in plan.configurations:
        folder = Path(configuration.output_dir)
        recipe = plan.recipe_of(configuration)
        lorsa = recipe.lorsa.to_dict()
        row: dict[str, Any] = {
            "index": configuration.index, "name": configuration.name, "overrides": configuration.overrides,
            "output_dir": configuration.output_dir, "status": "pending", "layers": recipe.lorsa.layers,
            "n_ov_heads": lorsa.get("n_ov_heads"), "n_qk_heads": lorsa.get("n_qk_heads"),
            "d_qk_head": lorsa.get("d_qk_head"), "top_k": lorsa.get("top_k"),
        }
        if (folder / "sweep_error.txt").is_file():
            row["status"] = "failed"
        final = folder / "final" / "final_metrics.json"
        if final.is_file():
            metrics = json.loads(final.read_text())
            row.update(status="done", metrics={k: metrics.get(k) for k in METRICS})
            result = folder / "sweep_result.json"
            row["seconds"] = json.loads(result.read_text())["seconds"] if result.is_file() else None
        rows.append(row)
    return rows


def _qk_columns(plan: SweepPlan, rows: list[dict[str, Any]]) -> None:
    """With a QK budget: the derived n_qk/d_qk and the QK parameters per layer (hidden size from the store)."""
    if plan.qk_budget is None:
        return
    values = plan.recipe_values({}, plan.output_dir)
    for row in rows:
        overrides = row["overrides"]
        row["n_qk_heads"] = lorsa_value(N_QK, overrides, values)
        row["d_qk_head"] = lorsa_value(D_QK, overrides, values)
        row["n_ov_heads"] = lorsa_value(N_OV, overrides, values)
        hidden = row.get("hidden_size")
        if hidden:
            row["qk_parameters"] = qk_parameters(row["n_qk_heads"], row["d_qk_head"], hidden)


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def markdown(plan: SweepPlan, rows: list[dict[str, Any]]) -> str:
    """The summary table: one line per configuration."""
    keys = list(plan.axes)
    derived = [key for key in (N_QK, D_QK) if plan.qk_budget is not None and key not in keys]
    columns = ["#", *keys, *derived, *(HEADINGS[m] for m in METRICS), "seconds", "status"]
    lines = [
        f"# Sweep of `{plan.recipe}`", "",
        f"Arguments: `{' '.join(plan.arguments)}` ({plan.mode}); store: `{plan.store or 'none (live)'}`."
        + (f" QK budget n_qk_heads x d_qk_head = {plan.qk_budget}." if plan.qk_budget is not None else ""), "",
        "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns),
    ]
    for row in rows:
        metrics = row.get("metrics", {})
        settings = [row["overrides"].get(key, row.get(key.rsplit(".", 1)[-1])) for key in keys + derived]
        cells = [row["index"], *settings, *(metrics.get(m) for m in METRICS), row.get("seconds"), row["status"]]
        lines.append("| " + " | ".join(_format(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(plan: SweepPlan) -> dict[str, Any]:
    """Write `sweep.json`, `sweep.md` and the plots from what has finished so far."""
    from .plots import plot_sweep

    folder = Path(plan.output_dir)
    with summary_lock(folder):
        rows = collect(plan)
        hidden = _hidden_size(plan)
        for row in rows:
            row["hidden_size"] = hidden
        _qk_columns(plan, rows)
        plots = plot_sweep(plan, rows, folder)
        summary = {"plan": plan.to_dict(), "configurations": rows, "plots": plots}
        atomic_write_text(folder / "sweep.json", json.dumps(summary, indent=2))
        atomic_write_text(folder / "sweep.md", markdown(plan, rows) + "".join(f"\n![{p}]({p})\n" for p in plots))
    return summary


def _hidden_size(plan: SweepPlan) -> int | None:
    """The base model's hidden size, from a finished run's Lorsa config."""
    for configuration in plan.configurations:
        config = Path(configuration.output_dir) / "final" / "config.json"
        if config.is_file():
            return json.loads(config.read_text())["hidden_size"]
    return None


__all__ = ["collect", "markdown", "write_summary"]
