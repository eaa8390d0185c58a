"""The earlier training of a Lorsa a run continues from (`init.from_pretrained`), recorded beside the new weights.

A warm restart's own recipe says only where it started. `earlier_stages` reads what trained that start (its
`training_recipe.json`, its `final_metrics.json` when it is a run's final/ folder, and its own history), so a
Lorsa trained in stages carries every stage's recipe in `training_history.json`, oldest first.
"""

from __future__ import annotations

import json
from typing import Any

from transformers.utils import cached_file

from ..publishing import FINAL_METRICS_FILE, HISTORY_FILE, RECIPE_FILE


def _read(source: str, name: str) -> Any:
    """A JSON file of the saved Lorsa `source` (folder or Hub id, through the Hub cache), or None when absent."""
    path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def earlier_stages(source: str) -> list[dict[str, Any]]:
    """Every stage that trained the Lorsa at `source`, oldest first: its history, then itself (`source`, its
    recipe, its final metrics; None where it has none, as for an imported Lorsa)."""
    history = _read(source, HISTORY_FILE) or {}
    itself = {
        "source": source, "recipe": _read(source, RECIPE_FILE), "final_metrics": _read(source, FINAL_METRICS_FILE),
    }
    return [*history.get("stages", []), itself]


__all__ = ["earlier_stages"]
