"""`lorsa-hf analyze`: read every head of one Lorsa layer over a corpus and write the report and the viewer."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ..evals.cli import texts_from_args


def register_analyze(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="top contexts, z-patterns, logit effects and detector scores of every head of one Lorsa layer",
        description="Stream a corpus through the base model up to LAYER with the Lorsa in place, and write "
        "store.safetensors (resumable), report.json, viewer.html (offline) and z-pattern heat maps into --output.",
    )
    parser.add_argument("--base", required=True, help="base model folder or Hub id, or 'embedded' (SmolLM2-135M)")
    parser.add_argument("--lorsa", required=True, help="Lorsa folder or Hub id")
    parser.add_argument("--layer", type=int, required=True, help="the base-model layer whose Lorsa to read")
    parser.add_argument("--tokenizer", default=None, help="tokenizer folder or Hub id (default: the base model's)")
    parser.add_argument("--tokens", type=int, default=1_048_576, help="corpus tokens to stream (default 1048576)")
    parser.add_argument("--output", default=None, help="output folder (default: ./lorsa-analysis-layerL)")
    parser.add_argument("--text-file", action="append", default=None,
                        help="corpus text file(s), one document each (default: the embedded corpus)")
    parser.add_argument("--split", choices=("train", "heldout"), default="train",
                        help="split of the embedded corpus, without --text-file (default: train)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-n", type=int, default=16, help="top contexts kept per head (default 16)")
    parser.add_argument("--heads", type=int, default=128, help="most frequent heads shown in the viewer")
    parser.add_argument("--restart", action="store_true", help="ignore a store already in --output")
    parser.add_argument("--device", default=None, help="e.g. cuda, cpu (default: where the model loads)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_analyze)


def _texts(args: argparse.Namespace) -> list[str] | None:
    """The `--text-file` documents, else the chosen split of the embedded corpus; None (after an error) when a
    file is missing."""
    try:
        texts, _ = texts_from_args(args)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return None
    if texts is not None:
        return texts
    from lorsa_hf import embedded_corpus

    return embedded_corpus(args.split)


def run_analyze(args: argparse.Namespace) -> int:
    from lorsa_hf import LorsaForReplacement

    from ..evals.runner import load_base
    from .pipeline import AnalysisOptions, analyze_layer
    from .report import ReportOptions
    from .stream import CorpusOptions

    if args.tokens <= 0 or args.top_n <= 0:
        print(f"error: --tokens and --top-n must be positive, got {args.tokens} and {args.top_n}", file=sys.stderr)
        return 2
    texts = _texts(args)
    if texts is None:
        return 2
    model, tokenizer, _ = load_base(args.base, args.tokenizer, torch.float32)
    if args.device:
        model.to(args.device)
    lorsa = LorsaForReplacement.from_pretrained(args.lorsa)
    options = AnalysisOptions(
        corpus=CorpusOptions(seq_len=args.seq_len, n_tokens=args.tokens, batch_size=args.batch_size),
        report=ReportOptions(heads=args.heads), top_n=args.top_n, resume=not args.restart,
        progress=not args.no_progress,
    )
    output = Path(args.output or f"lorsa-analysis-layer{args.layer}")
    command = " ".join(["lorsa-hf", *sys.argv[1:]]) if sys.argv[1:2] == ["analyze"] else "lorsa-hf analyze"
    try:
        summary = analyze_layer(
            model, tokenizer, lorsa, args.layer, texts, output, options,
            description=f"{args.base} / {args.lorsa}, layer {args.layer}; {command}",
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    counts = summary["counts"]
    for name in summary["detectors"]:
        print(f"{name:>16}: {counts['lorsa'][name]:5d} Lorsa heads, {counts['base'][name]:3d} base heads")
    print(f"wrote {output / 'viewer.html'}, {output / 'report.json'} and {output / 'store.safetensors'}")
    return 0


__all__ = ["register_analyze", "run_analyze"]
