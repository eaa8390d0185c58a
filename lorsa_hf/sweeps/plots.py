"""The sweep's plots: held-out FVU against each numeric swept key, one line per setting of the other keys
(FVU against d_qk at fixed QK parameters, FVU against K, ...). They need matplotlib (`lorsa-hf[sweep]`)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from ..io import atomic_write_path
from .grid import D_QK, N_QK
from .plan import SweepPlan


def _numeric(values: list[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _title(plan: SweepPlan, key: str) -> str:
    name = key.rsplit(".", 1)[-1]
    if plan.qk_budget is not None and key in (D_QK, N_QK):
        return f"Held-out FVU against {name}\nat fixed QK parameters (n_qk_heads x d_qk_head = {plan.qk_budget})"
    return f"Held-out FVU against {name}"


def plot_sweep(plan: SweepPlan, rows: list[dict[str, Any]], folder: Path) -> list[str]:
    """Write `fvu_vs_<key>.png` for each numeric swept key with finished runs; the file names written."""
    done = [row for row in rows if row["status"] == "done" and row["metrics"].get("heldout/fvu") is not None]
    keys = [key for key, values in plan.axes.items() if _numeric(values)]
    if not done or not keys:
        return []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for key in keys:
        others = [k for k in plan.axes if k != key] if plan.mode == "grid" else []
        figure, axes = plt.subplots(figsize=(5.5, 3.8))
        settings = itertools.product(*(plan.axes[k] for k in others))
        for setting in settings:
            chosen = [r for r in done if all(r["overrides"][k] == v for k, v in zip(others, setting, strict=True))]
            chosen.sort(key=lambda r: r["overrides"][key])
            if not chosen:
                continue
            label = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in zip(others, setting, strict=True)) or None
            xs = [r["overrides"][key] for r in chosen]
            axes.plot(xs, [r["metrics"]["heldout/fvu"] for r in chosen], marker="o", label=label)
        values = plan.axes[key]
        if min(values) > 0 and max(values) / min(values) >= 4:
            axes.set_xscale("log", base=2)
            axes.set_xticks(values, [str(v) for v in values])
        axes.set_xlabel(key)
        axes.set_ylabel("held-out FVU")
        axes.set_title(_title(plan, key), fontsize=9)
        axes.grid(alpha=0.3)
        if others:
            axes.legend(fontsize=7)
        figure.tight_layout()
        name = f"fvu_vs_{key.rsplit('.', 1)[-1]}.png"
        with atomic_write_path(folder / name) as staging:
            figure.savefig(staging, dpi=120, format="png")
        plt.close(figure)
        written.append(name)
    return written


__all__ = ["plot_sweep"]
