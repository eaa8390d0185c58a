"""The `lorsa-hf` command line. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .convert.cli import register as _register_convert
from .embedded.cli import register_cli as _register_embedded
from .evals.cli import register_eval as _register_eval
from .sweeps.cli import register_sweep as _register_sweep
from .training.cli import register_train as _register_train
from .training.store.cli import register_store as _register_store

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


SUBCOMMANDS: list[Registrar] = [_register_demo, _register_embedded, _register_convert, _register_train, _register_store,
                               _register_sweep, _register_eval]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lorsa-hf", description="Low-Rank Sparse Attention for transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in SUBCOMMANDS:
        register(subparsers)
    args, extra = parser.parse_known_args(argv)
    # `key=value` arguments may come after options (`sweep R a=1,2 --list b=3`); a subcommand that takes them
    # names its list in `intermixed`, and anything else left over is an error as usual.
    target = getattr(args, "intermixed", None)
    if extra and (target is None or any(not item or item.startswith("-") or "=" not in item for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        getattr(args, target).extend(extra)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
