"""`lorsa-hf store RECIPE [section.key=value ...]`: build (or finish building) a recipe's activation store."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..recipe import Recipe


def register_store(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "store",
        help="run the base model once and store the attention inputs/outputs a recipe trains on",
        description="Build the activation store at store.path for a recipe: the calibration, held-out and "
        "training batches' attention inputs and outputs of store.layers (default lorsa.layers). A killed build "
        "resumes where it stopped. Train from it with the same store.path.",
    )
    parser.add_argument("recipe", help="recipe file, or a bundled recipe name such as smollm2-135m")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides (store.path=runs/store)")
    parser.add_argument("--plan", action="store_true", help="print the planned size per split and exit")

    def run(args: argparse.Namespace) -> int:
        from ..recipe import RecipeError, load_recipe
        from .layout import StoreError

        try:
            recipe = load_recipe(args.recipe, args.overrides)
            if not recipe.store.path:
                raise StoreError("Set store.path (e.g. store.path=runs/store): the folder the store is written to.")
            if args.plan:
                print(json.dumps(_plan(recipe)))
                return 0
            from .writer import build_store

            folder = build_store(recipe)
        except (RecipeError, StoreError) as error:
            parser.error(str(error))
        from .reader import ActivationStore

        print(json.dumps({"store": str(folder), "tokens": ActivationStore(folder).manifest["tokens"]}))
        return 0

    parser.set_defaults(func=run, intermixed="overrides")


def _plan(recipe: Recipe) -> dict[str, Any]:
    """Bytes and tokens per split, from the base model's config alone."""
    from transformers import AutoConfig

    from .layout import plan_splits
    from .writer import planned_bytes

    if recipe.model.name == "embedded":
        from ...embedded import embedded_model_path

        config = AutoConfig.from_pretrained(embedded_model_path(recipe.model.cache_dir))
    else:
        config = AutoConfig.from_pretrained(recipe.model.name, revision=recipe.model.revision)
    sizes = planned_bytes(recipe, config.hidden_size)
    tokens = {p.name: p.batches * p.rows_per_batch * recipe.data.context_length for p in plan_splits(recipe)}
    return {"bytes": sizes, "total_bytes": sum(sizes.values()), "tokens": tokens}


__all__ = ["register_store"]
