"""The `lorsa-hf` command line. Each subcommand lives in its own module and registers itself here."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence

from .analysis.cli import register_analyze as _register_analyze
from .convert.cli import register as _register_convert
from .embedded.cli import register_cli as _register_embedded
from .evals.cli import register_eval as _register_eval
from .publish.cli import register_push as _register_push
from .publish.cli import register_ship as _register_ship
from .sweeps.cli import register_sweep as _register_sweep
from .training.cli import register_train as _register_train
from .training.store.cli import register_store as _register_store

Registrar = Callable[[argparse._SubParsersAction], None]


def _register_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the main job: the shipped Lorsa in the embedded model, evaluated and generating beside the clean model",
    )
    parser.add_argument("--output-dir", default="runs/demo", help="where the report (and, with --train, the run) go")
    parser.add_argument(
        "--eval-tokens", type=int, default=None, help="held-out tokens (default 2048; 4096 with --train)"
    )
    parser.add_argument("--limit", type=int, default=20, help="documents per lm-eval task (default 20)")
    parser.add_argument("--train", action="store_true", help="train a Lorsa on layer 3 from scratch instead (2 min)")
    parser.add_argument("--tokens", type=int, default=81_920, help="training tokens with --train")
    parser.add_argument("--tiny", action="store_true", help="a random Lorsa in a tiny random Llama instead (seconds)")

    def run(args: argparse.Namespace) -> int:
        from ._demo import run_demo, run_tiny_demo, run_train_demo

        if args.tiny:
            run_tiny_demo()
        elif args.train:
            run_train_demo(output_dir=args.output_dir, tokens=args.tokens, eval_tokens=args.eval_tokens or 4_096)
        else:
            run_demo(output_dir=args.output_dir, eval_tokens=args.eval_tokens or 2_048, lm_eval_limit=args.limit)
        return 0

    parser.set_defaults(func=run)


SUBCOMMANDS: list[Registrar] = [
    _register_demo, _register_embedded, _register_convert, _register_train, _register_store, _register_sweep,
    _register_eval, _register_ship, _register_push, _register_analyze,
]


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
