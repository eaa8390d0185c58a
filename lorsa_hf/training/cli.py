"""`lorsa-hf train RECIPE [section.key=value ...] [--resume | --overwrite]`, also under `accelerate launch`."""

from __future__ import annotations

import argparse
import json


def register_train(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a Lorsa from a recipe (YAML/TOML file or bundled recipe name)",
        description="Train a Lorsa from a recipe. Under `accelerate launch` or `torchrun` every process runs "
        "this same command; training.distribute picks ddp, layers or fsdp.",
    )
    parser.add_argument("recipe", help="recipe file, or a bundled recipe name such as smollm2-135m")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, value in YAML (training.lr=1e-3)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output_dir")
    parser.add_argument(
        "--overwrite", action="store_true", help="delete the run already in output_dir and start a new one"
    )
    parser.add_argument("--print-recipe", action="store_true", help="print the validated recipe and exit")

    def run(args: argparse.Namespace) -> int:
        from .recipe import RecipeError, load_recipe

        try:
            recipe = load_recipe(args.recipe, args.overrides)
        except RecipeError as error:
            parser.error(str(error))
        if args.print_recipe:
            print(json.dumps(recipe.to_dict(), indent=2))
            return 0
        from .trainer import train_from_recipe

        if args.resume and args.overwrite:
            parser.error("--resume continues the run in output_dir and --overwrite deletes it: pass only one.")
        try:
            metrics = train_from_recipe(recipe, resume=args.resume, overwrite=args.overwrite)
        except FileExistsError as error:
            parser.error(str(error))
        if metrics:
            keys = ("step", "tokens", "heldout/fvu", "heldout/l0", "heldout/dead_fraction", "heldout/tokens")
            print(json.dumps({k: v for k, v in metrics.items() if k in keys}))
        return 0

    parser.set_defaults(func=run, intermixed="overrides")


__all__ = ["register_train"]
