"""`lorsa-hf embedded`: build (or find) the cached model and corpus and print what they are.

Registering the subcommand imports nothing of the model build or the corpus fetch; running it does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add the `embedded` subcommand to the `lorsa-hf` parser."""
    parser = subparsers.add_parser("embedded", help="prepare the embedded SmolLM2-135M and corpus, print their info")
    parser.add_argument(
        "--cache-dir", default=None, help="cache folder (default: $LORSA_HF_CACHE or ~/.cache/lorsa_hf)"
    )
    parser.add_argument("--skip-model", action="store_true", help="prepare the corpus only")
    parser.add_argument("--skip-corpus", action="store_true", help="prepare the model only")
    parser.set_defaults(func=run_embedded)


def run_embedded(args: argparse.Namespace) -> int:
    """Prepare what `args` asks for and print its provenance as JSON; 1 with the fix on stderr when it cannot."""
    from .cache import EmbeddedAssetError
    from .corpus import embedded_corpus_info
    from .model import embedded_model_manifest, embedded_model_path, load_embedded_model

    report: dict[str, Any] = {}
    try:
        if not args.skip_model:
            path = embedded_model_path(args.cache_dir)
            started = time.perf_counter()
            model, _ = load_embedded_model(cache_dir=args.cache_dir)
            report["model"] = {
                "path": str(path),
                "load_seconds": round(time.perf_counter() - started, 2),
                **{k: v for k, v in embedded_model_manifest(args.cache_dir).items() if k != "built_at"},
            }
            del model
        if not args.skip_corpus:
            report["corpus"] = embedded_corpus_info(args.cache_dir)
    except EmbeddedAssetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0
