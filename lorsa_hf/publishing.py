"""What a published Lorsa holds and how it reaches the Hub: the files of a shipped folder, the eval numbers its
card's `model-index` must carry (taken from its own `results.json`), and the upload through `huggingface_hub`.

A helper at the bottom of the package: it reads files and dicts only, so that `LorsaForReplacement.push_to_hub`
and the `lorsa-hf push` command check and upload the same set of files in the same way.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RECIPE_FILE = "training_recipe.json"
RESULTS_FILE = "results.json"
CARD_FILE = "README.md"
HISTORY_FILE = "training_history.json"
FINAL_METRICS_FILE = "final_metrics.json"
"""What a training run's final/ folder holds beside its recipe (not published: the card reports it)."""
SIDECAR_FILES = (RECIPE_FILE, RESULTS_FILE, CARD_FILE)
"""The files beside the weights: how it was trained, how it was evaluated, and the card written from both."""
OPTIONAL_FILES = (HISTORY_FILE,)
"""Beside the weights only where they apply: the earlier stages' recipes, where training continued from another
Lorsa."""
PUBLISHED_FILES = (CONFIG_FILE, WEIGHTS_FILE, *SIDECAR_FILES, *OPTIONAL_FILES)
"""Every file a published Lorsa folder may hold, and the only ones uploaded from it."""

TASK_TYPE = "text-generation"
HEADLINE_RECONSTRUCTION = {"fvu": "FVU", "l0": "L0", "dead_fraction": "dead fraction"}
HEADLINE_DOWNSTREAM = {
    "ce_spliced": "CE spliced", "kl_spliced": "KL(clean ‖ spliced)", "loss_recovered_zero": "loss recovered (zero)",
}
HEADLINE_SAELENS = ("explained_variance", "ce_loss_score", "kl_div_score", "l2_ratio", "cossim")


class PublishError(ValueError):
    """A folder that cannot be published as it is; the message names the problem and the fix."""


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def headline_metrics(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The numbers a card's `model-index` carries, from an eval run's `results.json` content: per layer set
    (each layer, then all), FVU, L0, dead fraction, CE and KL spliced, loss recovered, and the SAELens-named
    scores. Each entry: `type` (`layer_<L>/<key>` or `all_layers/<key>`, the key as in results.json), `name`
    (for people) and `value`."""
    entries = []
    sets = results["downstream"]["layer_sets"]
    for layer_set, downstream in sets.items():
        prefix = f"layer_{layer_set}" if layer_set != "all" else "all_layers"
        task = f"layer {layer_set}" if layer_set != "all" else f"layers {', '.join(map(str, downstream['layers']))}"
        values: list[tuple[str, str, Any]] = []
        reconstruction = results["reconstruction"].get(layer_set, {})
        values += [(key, name, reconstruction.get(key)) for key, name in HEADLINE_RECONSTRUCTION.items()]
        values += [(key, name, downstream.get(key)) for key, name in HEADLINE_DOWNSTREAM.items()]
        saelens = results.get("saelens", {}).get(layer_set, {})
        values += [(key, f"{key} (SAELens)", saelens.get(key)) for key in HEADLINE_SAELENS]
        entries += [
            {"type": f"{prefix}/{key}", "name": f"{task}: {name}", "value": float(value)}
            for key, name, value in values
            if _finite(value)
        ]
    return entries


def dataset_name(results: dict[str, Any]) -> str:
    """The eval data as the card's `model-index` names it."""
    return f"held-out text: {results['data']['source']}"


def card_mismatches(card_text: str, results: dict[str, Any]) -> list[str]:
    """How a card's `model-index` differs from the numbers of `results` (empty when every number it should
    carry is there, with the same value, and it carries no other)."""
    from huggingface_hub import ModelCard

    card = ModelCard(card_text, ignore_metadata_errors=False)
    found = {r.metric_type: r.metric_value for r in card.data.eval_results or []}
    wanted = {e["type"]: e["value"] for e in headline_metrics(results)}
    problems = [f"{key}: card has no value, results.json has {v}" for key, v in wanted.items() if key not in found]
    problems += [
        f"{key}: card says {found[key]}, results.json says {value}"
        for key, value in wanted.items()
        if key in found and not math.isclose(float(found[key]), value, rel_tol=1e-9, abs_tol=0)
    ]
    problems += [f"{key}: in the card, not in results.json" for key in found if key not in wanted]
    return problems


def check_sidecars(folder: str | os.PathLike, require: Sequence[str] = SIDECAR_FILES) -> list[str]:
    """Check the files beside a Lorsa's weights in `folder` and return the ones to upload.

    Every file of `require` must be there; a card is only published with the `results.json` its numbers come
    from, and must carry exactly those numbers. Raises `PublishError` otherwise.
    """
    folder = Path(folder)
    missing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, *require) if not (folder / name).is_file()]
    if missing:
        needed = ", ".join((CONFIG_FILE, WEIGHTS_FILE, *SIDECAR_FILES))
        raise PublishError(
            f"{folder} has no {', '.join(missing)}: a published Lorsa holds {needed}. "
            "Build the folder from a training run's final/ folder with `lorsa-hf ship RUN/final OUT`."
        )
    card, results = folder / CARD_FILE, folder / RESULTS_FILE
    if card.is_file() != results.is_file():
        raise PublishError(
            f"{folder} has {'a card but no results.json' if card.is_file() else 'results.json but no card'}: the "
            "card's numbers must come from the folder's own results.json. Write the card from it with "
            "`lorsa_hf.evals.write_model_card(results.json, README.md)` (or `lorsa-hf ship`)."
        )
    if card.is_file():
        try:
            mismatches = card_mismatches(card.read_text(encoding="utf-8"), json.loads(results.read_text("utf-8")))
        except (ValueError, KeyError, TypeError) as error:
            raise PublishError(f"Cannot read {card} against {results}: {error}. Rewrite the card from it.") from error
        if mismatches:
            raise PublishError(
                f"The numbers of {card} do not come from {results}: {'; '.join(mismatches[:5])}"
                f"{' ...' if len(mismatches) > 5 else ''}. Rewrite the card from results.json "
                "(`lorsa_hf.evals.write_model_card`, or `lorsa-hf ship`)."
            )
    return [name for name in PUBLISHED_FILES if (folder / name).is_file()]


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    files: Sequence[str],
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    subfolder: str = "",
    token: bool | str | None = None,
    create_pr: bool = False,
) -> Any:
    """Upload `files` of `folder` to the model repo `repo_id` in one commit (under `subfolder`, on branch
    `revision`, created from the default branch when missing) and return the `CommitInfo`."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True, repo_type="model").repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, token=token, exist_ok=True)
    prefix = f"{subfolder.strip('/')}/" if subfolder.strip("/") else ""
    operations = [CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=Path(folder) / name) for name in files]
    return api.create_commit(
        repo_id, operations, commit_message=commit_message or "Upload Lorsa", token=token, revision=revision,
        create_pr=create_pr,
    )


__all__ = [
    "CARD_FILE",
    "CONFIG_FILE",
    "FINAL_METRICS_FILE",
    "HISTORY_FILE",
    "OPTIONAL_FILES",
    "PUBLISHED_FILES",
    "RECIPE_FILE",
    "RESULTS_FILE",
    "SIDECAR_FILES",
    "WEIGHTS_FILE",
    "PublishError",
    "card_mismatches",
    "check_sidecars",
    "dataset_name",
    "headline_metrics",
    "upload_folder",
]
