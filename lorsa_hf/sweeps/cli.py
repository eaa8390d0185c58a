"""`lorsa-hf sweep RECIPE key=v1,v2,... [key2=...]`: many training runs over one activation store."""

from __future__ import annotations

import argparse
import json


def _budget(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--qk-budget takes 'auto' or a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--qk-budget must be positive, got {value}")
    return value


def register_sweep(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="train a grid or list of recipe variants over one activation store",
        description="Every configuration is a normal training run in OUTPUT_DIR/runs/NNN-..., resumable one by one: "
        "rerun the same command after a kill and finished configurations are skipped. A key with one value is a "
        "fixed override. The shared activation store (store.path, default OUTPUT_DIR/store) is built first. Under "
        "`accelerate launch --num_processes N` each process trains its share of the configurations.",
    )
    parser.add_argument("recipe", help="recipe file, or a bundled recipe name such as smollm2-135m")
    parser.add_argument("arguments", nargs="*", help="section.key=v1,v2,... (values in YAML, lorsa.top_k=16,32,64)")
    parser.add_argument("--list", action="store_true", help="take the i-th value of every key together (no grid)")
    parser.add_argument(
        "--qk-budget", type=_budget, default=None, metavar="auto|N",
        help="hold n_qk_heads x d_qk_head (the QK parameters) at N, or at the recipe's product with 'auto': "
        "a configuration setting lorsa.d_qk_head gets n_qk_heads = N / d_qk_head, and the other way round",
    )
    parser.add_argument("--output-dir", default=None, help="sweep folder (default: the recipe's output_dir + -sweep)")
    parser.add_argument("--live", action="store_true", help="run the base model in every configuration, no store")
    parser.add_argument("--print-plan", action="store_true", help="print the configurations and exit")

    def run(args: argparse.Namespace) -> int:
        from ..training.recipe import RecipeError
        from ..training.store import StoreError
        from .plan import make_plan

        try:
            mode = "list" if args.list else "grid"
            plan = make_plan(args.recipe, args.arguments, mode, args.qk_budget, args.output_dir, args.live)
        except (RecipeError, StoreError, ValueError) as error:
            parser.error(str(error))
        if args.print_plan:
            print(json.dumps(plan.to_dict(), indent=2))
            return 0
        from .runner import run_sweep, take_launch_share

        rank, world = take_launch_share()
        try:
            failed = run_sweep(plan, rank, world)
        except (RecipeError, StoreError) as error:
            parser.error(str(error))
        if failed:
            print(f"[sweep] failed: {', '.join(failed)} (see sweep_error.txt in their folders); rerun to retry them")
            return 1
        return 0

    parser.set_defaults(func=run, intermixed="arguments")


__all__ = ["register_sweep"]
