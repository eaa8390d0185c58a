"""Write the offline viewer: one HTML file holding the report's data, its style and its script (no server, no
network), and PNG heat maps of z-patterns."""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

from ..io import atomic_write_path, atomic_write_text
from .viewer_page import PAGE


def render_viewer(data: dict[str, Any], title: str) -> str:
    """The viewer page for a report's data (see `lorsa_hf.analysis.pipeline`)."""
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=True).replace("</", "<\\/")
    return PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)


def write_viewer(path: str | os.PathLike, data: dict[str, Any], title: str) -> Path:
    """Write the viewer page to `path` atomically and return the path."""
    target = Path(path)
    page = render_viewer(data, title)
    atomic_write_text(target, page)
    return target


def write_z_pattern_heatmap(
    path: str | os.PathLike, contributions: Any, labels: list[str], title: str, key_labels: list[str] | None = None
) -> Path:
    """A heat map of a head's z-pattern: row s, column t is the contribution of token t to the head's z at token
    s (a diverging scale centred on zero). `labels` name the rows, and the columns too unless `key_labels` does
    (keys that are not the rows' tokens, such as earlier tokens outside the window, labelled with their
    position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = labels if key_labels is None else key_labels
    values = [[float(v) for v in row] for row in contributions]
    limit = max((abs(v) for row in values for v in row), default=0.0) or 1.0
    height = max(4.0, 0.28 * len(labels) + 2.0)
    figure, axes = plt.subplots(figsize=(max(4.0, 0.28 * len(columns) + 2.0) + 1.2, height))
    image = axes.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes.set_xticks(range(len(columns)), [repr(label)[1:-1] for label in columns], rotation=90, fontsize=7)
    axes.set_yticks(range(len(labels)), [repr(label)[1:-1] for label in labels], fontsize=7)
    if len(columns) > len(labels):
        axes.axvline(len(columns) - len(labels) - 0.5, color="0.3", linewidth=0.8)
    axes.set_xlabel("key token t (contributes)")
    axes.set_ylabel("query token s (activation z at s)")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    target = Path(path)
    with atomic_write_path(target) as staging:
        figure.savefig(staging, dpi=120, format="png")
    plt.close(figure)
    return target


__all__ = ["render_viewer", "write_viewer", "write_z_pattern_heatmap"]
