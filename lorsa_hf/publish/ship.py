"""`ship_run`: a training run's `final/` folder made into the folder that is shipped and published: the Lorsa
in bfloat16, its training recipe, `results.json` from the eval suite run on those bf16 weights, and the card."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..evals.card import write_model_card
from ..evals.options import EvalOptions
from ..evals.report import write_results
from ..evals.runner import EMBEDDED, evaluate_lorsa, write_outputs
from ..io import atomic_save_directory
from ..publishing import (
    CARD_FILE,
    FINAL_METRICS_FILE,
    HISTORY_FILE,
    RECIPE_FILE,
    RESULTS_FILE,
    PublishError,
    check_sidecars,
)
from .push import check_loadable

SHIP_OPTIONS = EvalOptions(n_tokens=8_192, mean_tokens=2_048, lm_eval_limit=100)
"""What the shipped results.json is measured with by default: as the report in docs/reports/."""


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def ship_run(
    final_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | PreTrainedModel = EMBEDDED,
    tokenizer: str | os.PathLike | PreTrainedTokenizerBase | None = None,
    texts: Sequence[str] | None = None,
    options: EvalOptions = SHIP_OPTIONS,
    dtype: torch.dtype = torch.bfloat16,
    report_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    license: str | None = "apache-2.0",
) -> dict[str, Any]:
    """Write `out_dir` from the training run folder `final_dir` (config.json, model.safetensors,
    training_recipe.json, and training_history.json after a continued run): the weights cast to `dtype`, the
    recipe and history, `results.json` of `evaluate_lorsa` on the cast weights (against `base`, on `texts` or
    the embedded held-out split) and the README.md card written from them. With `report_dir`, the full eval
    report goes there too. The folder appears in one rename, and is checked as `lorsa-hf push` checks it.
    Returns the results."""
    final_dir, out_dir = Path(final_dir), Path(out_dir)
    recipe = _read_json(final_dir / RECIPE_FILE)
    if recipe is None:
        raise PublishError(
            f"{final_dir} has no {RECIPE_FILE}: pass the final/ folder of a `lorsa-hf train` run (it writes the "
            "recipe beside the weights)."
        )
    lorsa = check_loadable(final_dir).to(dtype)
    with atomic_save_directory(out_dir) as staging:
        staging = Path(staging)
        lorsa.save_pretrained(staging)
        shutil.copyfile(final_dir / RECIPE_FILE, staging / RECIPE_FILE)
        history = _read_json(final_dir / HISTORY_FILE)
        if history is not None:
            shutil.copyfile(final_dir / HISTORY_FILE, staging / HISTORY_FILE)
        shipped = check_loadable(staging)
        shipped.name_or_path = out_dir.name
        results = evaluate_lorsa(base, shipped, options, tokenizer=tokenizer, texts=texts)
        write_results(results, staging / RESULTS_FILE)
        write_model_card(
            results, staging / CARD_FILE, repo_id=repo_id, license=license, recipe=recipe,
            training_metrics=_read_json(final_dir / FINAL_METRICS_FILE),
            history=(history or {}).get("stages"),
        )
        check_sidecars(staging)
    if report_dir is not None:
        write_outputs(results, report_dir)
    return results


__all__ = ["SHIP_OPTIONS", "ship_run"]
