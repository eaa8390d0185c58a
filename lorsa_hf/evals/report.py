"""What an eval run leaves behind: `results.json` (every number), `report.md`, plots, all written atomically."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from ..io import atomic_write_path, atomic_write_text

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
LAYER_PLOT = "fvu_loss_recovered.png"
FREQUENCY_PLOT = "head_frequency.png"


def _json_ready(value: Any) -> Any:
    """NaN and infinities become null (strict JSON); tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def write_results(results: dict[str, Any], path: str | os.PathLike) -> None:
    """`results` as strict JSON (NaN as null), atomically."""
    atomic_write_text(path, json.dumps(_json_ready(results), indent=2, allow_nan=False) + "\n")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1e5 or (value != 0 and abs(value) < 1e-3):
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(results: dict[str, Any]) -> str:
    """The Markdown report of one eval run."""
    base, lorsa, data = results["base_model"], results["lorsa"], results["data"]
    out = [
        f"# Lorsa eval: {lorsa.get('name_or_path') or 'Lorsa'} on {base.get('name_or_path') or base['model_type']}",
        "",
        f"Layers {', '.join(map(str, lorsa['layers']))}; {lorsa['n_ov_heads']:,} heads in {lorsa['n_qk_heads']} "
        f"QK groups of d_qk {lorsa['d_qk_head']}, top_k {lorsa['top_k']} ({lorsa['activation']}).",
        f"Data: {data['source']}; {data['n_eval_tokens']:,} eval tokens ({data['n_counted_tokens']:,} counted, BOS and "
        f"padding excluded) in rows of {data['seq_len']}; mean-ablation statistics over a separate "
        f"{data['n_mean_tokens']:,} tokens. Seed {results['seed']}.",
        "",
        "## Reconstruction (per layer, clean inputs)",
        "",
    ]
    rows = []
    for layer, m in results["reconstruction"].items():
        rows.append(
            [
                layer, _number(m["fvu"]), _number(m["explained_variance"]), _number(m["mse"]),
                _number(m["cosine_similarity"]), _number(m["relative_norm"]), _number(m.get("l0"), 2),
                f"{_number(m.get('dead_fraction'))} ({m.get('dead_heads', '–')})", f"{m['n_tokens']:,}",
            ]
        )
    out.append(
        _table(
            ["layer", "FVU", "explained var.", "MSE", "cosine", "‖ŷ‖/‖y‖", "L0", "dead fraction (heads)", "tokens"],
            rows,
        )
    )
    downstream = results["downstream"]
    out += [
        "",
        "## Downstream loss",
        "",
        f"Clean CE {_number(downstream['ce_clean'])} nats/token over {downstream['n_tokens']:,} predictions. "
        "Loss recovered = (CE_ablated − CE_spliced) / (CE_ablated − CE_clean); KL(clean ‖ ·) per token.",
        "",
    ]
    rows = []
    for name, m in downstream["layer_sets"].items():
        rows.append(
            [
                name if name != "all" else f"all ({', '.join(map(str, m['layers']))})",
                _number(m["ce_spliced"]), _number(m["ce_zero"]), _number(m["ce_mean"]),
                _number(m["loss_recovered_zero"]), _number(m["loss_recovered_mean"]),
                _number(m["kl_spliced"]), _number(m["kl_zero"]), _number(m["kl_mean"]),
            ]
        )
    out.append(
        _table(
            [
                "layers spliced", "CE spliced", "CE zero-abl.", "CE mean-abl.", "loss rec. (zero)",
                "loss rec. (mean)", "KL spliced", "KL zero", "KL mean",
            ],
            rows,
        )
    )
    if results.get("lm_eval"):
        out += ["", "## lm-eval (all layers spliced)", ""]
        rows = []
        for task, metrics in results["lm_eval"]["tasks"].items():
            for metric, m in metrics.items():
                arrow = {True: " ↑", False: " ↓"}.get(m.get("higher_is_better"), "")
                rows.append(
                    [
                        task, metric + arrow, f"{_number(m['clean'])} ± {_number(m['clean_stderr'])}",
                        f"{_number(m['spliced'])} ± {_number(m['spliced_stderr'])}",
                        f"{_number(m['delta'])} ± {_number(m['delta_stderr'])}", m.get("delta_stderr_kind") or "–",
                        _number(m.get("n_samples")),
                    ]
                )
        out.append(_table(["task", "metric", "clean", "spliced", "Δ (spliced − clean)", "Δ error", "docs"], rows))
    out += ["", "## Plots", "", f"![FVU and loss recovered per layer]({LAYER_PLOT})", ""]
    if any("frequency_histogram" in m for m in results["reconstruction"].values()):
        out += [f"![Head activation frequency]({FREQUENCY_PLOT})", ""]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    out += ["## Environment", "", f"{versions}. Device {base.get('device')}, dtype {base.get('dtype')}.", ""]
    return "\n".join(out)


def plot_layers(results: dict[str, Any], path: str | os.PathLike) -> None:
    """FVU (left) and loss recovered against both ablations (right), per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(results["reconstruction"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(layers, [results["reconstruction"][layer]["fvu"] or 0.0 for layer in layers], color="tab:blue")
    left.set(title="FVU (lower is better)", xlabel="layer", ylabel="FVU")
    sets = results["downstream"]["layer_sets"]
    names = list(sets)
    positions = range(len(names))
    for offset, ablation, color in ((-0.2, "zero", "tab:green"), (0.2, "mean", "tab:orange")):
        values = [sets[name][f"loss_recovered_{ablation}"] for name in names]
        right.bar(
            [p + offset for p in positions], [v if v is not None else 0.0 for v in values], width=0.4,
            label=f"vs {ablation} ablation", color=color,
        )
    right.set_xticks(list(positions), names)
    right.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    right.set(title="Loss recovered (higher is better)", xlabel="layers spliced")
    right.legend(fontsize="small")
    figure.tight_layout()
    with atomic_write_path(path) as staging:
        figure.savefig(staging, dpi=120, format="png")
    plt.close(figure)


def plot_frequencies(results: dict[str, Any], path: str | os.PathLike) -> None:
    """Histogram of log10 head activation frequency, one line per layer, dead heads in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for layer, metrics in results["reconstruction"].items():
        histogram = metrics.get("frequency_histogram")
        if not histogram:
            continue
        edges = histogram["log10_frequency_edges"]
        axis.stairs(histogram["counts"], edges, label=f"layer {layer} ({histogram['dead']} dead)")
    axis.set(xlabel="log10 activation frequency", ylabel="heads", title="Lorsa head activation frequency")
    axis.legend(fontsize="small")
    figure.tight_layout()
    with atomic_write_path(path) as staging:
        figure.savefig(staging, dpi=120, format="png")
    plt.close(figure)


def write_report(results: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Path]:
    """Write `results.json`, `report.md` and the plots into `output_dir`; return their paths."""
    output = Path(output_dir)
    paths = {"results": output / RESULTS_FILE, "report": output / REPORT_FILE, "layer_plot": output / LAYER_PLOT}
    write_results(results, paths["results"])
    plot_layers(results, paths["layer_plot"])
    if any("frequency_histogram" in m for m in results["reconstruction"].values()):
        paths["frequency_plot"] = output / FREQUENCY_PLOT
        plot_frequencies(results, paths["frequency_plot"])
    atomic_write_text(paths["report"], render_markdown(_json_ready(results)))
    return paths


__all__ = ["load_results", "plot_frequencies", "plot_layers", "render_markdown", "write_report", "write_results"]
