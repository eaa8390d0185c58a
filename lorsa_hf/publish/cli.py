"""`lorsa-hf ship RUN_FINAL OUT` (a training run's final folder made into a published folder) and
`lorsa-hf push FOLDER REPO_ID` (such a folder uploaded to the Hub)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..evals.cli import add_eval_arguments, options_from_args, texts_from_args
from ..publishing import PUBLISHED_FILES, PublishError


def register_ship(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ship",
        help="make a training run's final/ folder into a published Lorsa folder (bf16, recipe, results.json, card)",
        description="Cast the Lorsa of a `lorsa-hf train` run's final/ folder to bfloat16, copy its recipe, run "
        "the eval suite on the cast weights and write results.json and the README.md card beside them.",
    )
    parser.add_argument("run_final", help="the final/ folder of a training run")
    parser.add_argument("out", help="the folder to write (e.g. lorsa_hf/pretrained/smollm2-135m-lorsa)")
    parser.add_argument("--base", default="embedded", help="base model folder or Hub id (default: embedded)")
    parser.add_argument("--report-dir", default=None, help="also write the full eval report (report.md, plots) here")
    parser.add_argument("--repo-id", default=None, help="the Hub repo id the card's example loads from")
    parser.add_argument("--license", default="apache-2.0", help="the card's license (default apache-2.0)")
    add_eval_arguments(parser, tokens=8_192, mean_tokens=2_048, limit=100)

    def run(args: argparse.Namespace) -> int:
        from .ship import ship_run

        try:
            texts, _ = texts_from_args(args)
            results = ship_run(
                args.run_final, args.out, base=args.base, tokenizer=args.tokenizer, texts=texts,
                options=options_from_args(args), report_dir=args.report_dir, repo_id=args.repo_id,
                license=args.license,
            )
        except (PublishError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        out = Path(args.out)
        files = [name for name in PUBLISHED_FILES if (out / name).is_file()]
        size = sum((out / name).stat().st_size for name in files) / 2**20
        for layer, metrics in results["reconstruction"].items():
            print(f"layer {layer}: FVU {metrics['fvu']:.4f}, L0 {metrics.get('l0', float('nan')):.1f}")
        print(f"wrote {out} ({', '.join(files)}; {size:.1f} MiB)")
        return 0

    parser.set_defaults(func=run)


def register_push(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "push",
        help="upload a published Lorsa folder (config, weights, recipe, results.json, card) to the Hub",
        description="Check that FOLDER holds a loadable Lorsa with its recipe, results.json and a card whose "
        "numbers are those of results.json, then upload those files to REPO_ID in one commit.",
    )
    parser.add_argument("folder")
    parser.add_argument("repo_id")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to push to (created when missing)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--subfolder", default="", help="folder inside the repository")

    def run(args: argparse.Namespace) -> int:
        from .push import push_folder

        try:
            commit = push_folder(
                args.folder, args.repo_id, private=args.private or None, revision=args.revision,
                commit_message=args.commit_message, subfolder=args.subfolder,
            )
        except PublishError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
        return 0

    parser.set_defaults(func=run)


__all__ = ["register_push", "register_ship"]
