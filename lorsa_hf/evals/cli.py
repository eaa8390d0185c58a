"""`lorsa-hf eval`: every eval of a Lorsa in one command, written to a folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .lm_eval import DEFAULT_TASKS
from .options import EvalOptions

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_eval_arguments(
    parser: argparse.ArgumentParser, tokens: int = 16_384, mean_tokens: int = 4_096, limit: float | None = None
) -> None:
    """The flags that say what an eval measures and on how much data (`lorsa-hf eval`, `lorsa-hf ship`)."""
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the base model's)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="layers to evaluate (default: all)")
    parser.add_argument(
        "--tasks", nargs="+", default=list(DEFAULT_TASKS),
        help=f"lm-eval tasks (default: {' '.join(DEFAULT_TASKS)}); 'none' skips lm-eval",
    )
    parser.add_argument("--include-path", default=None, help="extra folder of lm-eval task YAMLs")
    parser.add_argument(
        "--text-file", action="append", default=None,
        help="held-out text file(s) for reconstruction and downstream loss (default: embedded held-out split)",
    )
    parser.add_argument("--tokens", type=int, default=tokens, help=f"eval tokens (default {tokens})")
    parser.add_argument(
        "--mean-tokens", type=int, default=mean_tokens, help=f"tokens for mean-ablation means (default {mean_tokens})"
    )
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--limit", type=float, default=limit, help=f"documents per lm-eval task (default: {limit or 'all'})"
    )
    parser.add_argument("--lm-eval-batch-size", type=int, default=8)
    parser.add_argument("--bootstrap-iters", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def register_eval(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="reconstruction, downstream loss and lm-eval deltas of a Lorsa; writes results.json, report.md, plots",
        description="Evaluate a Lorsa spliced into its base model. Writes results.json (every number, versions, "
        "seed, token counts), report.md, plots and model_card.md into --output.",
    )
    parser.add_argument("--base", required=True, help="base model folder or Hub id, or 'embedded' (SmolLM2-135M)")
    parser.add_argument("--lorsa", required=True, help="Lorsa folder or Hub id")
    parser.add_argument("--output", default="lorsa-eval", help="output folder (default: ./lorsa-eval)")
    add_eval_arguments(parser)
    parser.set_defaults(func=run_eval)


def texts_from_args(args: argparse.Namespace) -> tuple[list[str] | None, str | None]:
    """The held-out texts of `--text-file` and how to describe them (None, None: the embedded split)."""
    if not args.text_file:
        return None, None
    missing = [path for path in args.text_file if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"--text-file not found: {', '.join(missing)}")
    texts = [Path(path).read_text(encoding="utf-8") for path in args.text_file]
    return texts, "text files " + ", ".join(Path(path).name for path in args.text_file)


def options_from_args(args: argparse.Namespace) -> EvalOptions:
    """The `EvalOptions` of the flags of `add_eval_arguments`."""
    tasks = [] if [t.lower() for t in args.tasks] == ["none"] else args.tasks
    limit = None if args.limit is None else (int(args.limit) if args.limit >= 1 else args.limit)
    return EvalOptions(
        layers=args.layers,
        tasks=tasks,
        n_tokens=args.tokens,
        mean_tokens=args.mean_tokens,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        lm_eval_limit=limit,
        lm_eval_batch_size=args.lm_eval_batch_size,
        bootstrap_iters=args.bootstrap_iters,
        include_path=args.include_path,
        seed=args.seed,
        device=args.device,
        dtype=DTYPES[args.dtype],
        progress=not args.no_progress,
    )


def run_eval(args: argparse.Namespace) -> int:
    from .runner import evaluate_lorsa

    try:
        texts, source = texts_from_args(args)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    results = evaluate_lorsa(
        args.base, args.lorsa, options_from_args(args), tokenizer=args.tokenizer, texts=texts, text_source=source,
        output_dir=args.output,
    )
    for layer, metrics in results["reconstruction"].items():
        spliced = results["downstream"]["layer_sets"][layer]
        print(
            f"layer {layer}: FVU {metrics['fvu']:.4f}, L0 {metrics.get('l0', float('nan')):.1f}, "
            f"loss recovered (zero) {spliced['loss_recovered_zero']:.4f}, KL {spliced['kl_spliced']:.4f}"
        )
    print(f"wrote {Path(args.output) / 'results.json'} and {Path(args.output) / 'report.md'}")
    return 0


__all__ = ["add_eval_arguments", "options_from_args", "register_eval", "run_eval", "texts_from_args"]
