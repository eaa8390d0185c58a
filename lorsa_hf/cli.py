"""The `lorsa-hf` command line. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .analysis.cli import register_analyze as _register_analyze
from .convert.cli import register as _register_convert
from .embedded.cli import register_cli as _register_embedded
from .evals.cli import register_eval as _register_eval
from .training.cli import register_train as _register_train

Registrar = Callable[[argparse._SubParsersAction], None]


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo", help="the main job: train a Lorsa on the embedded model, evaluate it, generate with it spliced in"
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where the run and its report go")
    parser.add_argument("--tokens", type=int, default=81_920, help="training tokens")
    parser.add_argument("--eval-tokens", type=int, default=4_096, help="held-out tokens for the evaluation")
    parser.add_argument("--tiny", action="store_true", help="a random Lorsa in a tiny random Llama instead (seconds)")

    def run(args: argparse.Namespace) -> int:
        from ._demo import run_demo, run_tiny_demo

        if args.tiny:
            run_tiny_demo()
        else:
            run_demo(output_dir=args.output_dir, tokens=args.tokens, eval_tokens=args.eval_tokens)
        return 0

    parser.set_defaults(func=run)


SUBCOMMANDS: list[Registrar] = [
    _register_demo, _register_embedded, _register_convert, _register_train, _register_eval, _register_analyze,
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorsa-hf", description="Low-Rank Sparse Attention for transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
