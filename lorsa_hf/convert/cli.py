"""`lorsa-hf convert SRC OUT --base BASE [--layer L] [--weights-already-folded]`."""

from __future__ import annotations

import argparse
import sys

import torch


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a llamascopium (lm-saes) or paper-era OpenMOSS/Lorsa checkpoint into the lorsa_hf format",
        description="Convert a Lorsa checkpoint published by llamascopium (lm-saes) or by the paper-era "
        "OpenMOSS/Lorsa code into the lorsa_hf format, folding the base model's input norm and the dataset-wise "
        "normalisation into the weights. SRC is a local folder or a Hub repo id.",
    )
    parser.add_argument(
        "src", metavar="SRC", help="checkpoint folder or Hub repo id (one checkpoint, or one subfolder per layer)"
    )
    parser.add_argument("out", metavar="OUT", help="folder to write the converted Lorsa to")
    parser.add_argument("--base", required=True, help="base model folder or Hub repo id the Lorsa was trained on")
    parser.add_argument(
        "--layer",
        type=int,
        action="append",
        dest="layers",
        metavar="L",
        help="layer to convert (repeatable; default: every layer the source holds)",
    )
    parser.add_argument("--subfolder", default="", help="subfolder of SRC holding the checkpoint(s)")
    parser.add_argument("--revision", default=None, help="revision of SRC on the Hub")
    parser.add_argument("--base-revision", default=None, help="revision of the base model on the Hub")
    parser.add_argument(
        "--weights-already-folded",
        action="store_true",
        help="the weights already include the dataset-wise norms although config.json says "
        "'dataset-wise' (the folder a finished llamascopium training run writes)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16", "float64"),
        help="dtype of the converted weights (default float32)",
    )

    def run(args: argparse.Namespace) -> int:
        from .converter import convert_checkpoint
        from .foreign import CheckpointError

        try:
            conversion = convert_checkpoint(
                args.src,
                args.base,
                args.out,
                layers=args.layers,
                subfolder=args.subfolder,
                revision=args.revision,
                base_revision=args.base_revision,
                weights_already_folded=args.weights_already_folded,
                dtype=getattr(torch, args.dtype),
            )
        except CheckpointError as error:
            print(f"lorsa-hf convert: error: {error}", file=sys.stderr)
            return 2
        print(conversion.report)
        print(f"Wrote {args.out}")
        return 0

    parser.set_defaults(func=run)
