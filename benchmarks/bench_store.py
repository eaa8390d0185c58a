"""Benchmark: reading a batch's activations from an activation store against recomputing them with the base model.

Builds a small store for a recipe (default: the embedded SmolLM2-135M recipe, one layer) in a temporary folder,
then, alternating in each round, times (a) the live `ActivationSource` (the base model's forward up to the
deepest stored layer) and (b) a fresh `ActivationStore` reading and verifying the same batches (sha256 of every
shard it opens, then the lookup by rows). The store's files are in the OS page cache after the build, so (b) is
the warm-disk read; a cold read adds the disk's time for the bytes reported. Output: one JSON line per
measurement, then a table.

    python benchmarks/bench_store.py                                   # smollm2-135m, layer 3, 4 batches
    python benchmarks/bench_store.py --overrides lorsa.layers=[18] --batches 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lorsa_hf.training.activations import ActivationSource, load_base_model
from lorsa_hf.training.recipe import load_recipe
from lorsa_hf.training.store import ActivationStore, build_store


def time_pass(function: Callable[[torch.Tensor, torch.Tensor], object], batches: list[tuple]) -> float:
    """Seconds to get the activations of every batch."""
    start = time.perf_counter()
    for ids, attention, _ in batches:
        function(ids, attention)
    return time.perf_counter() - start


def measure(args: argparse.Namespace, folder: Path) -> list[dict]:
    """Build a store under `folder`, then time recomputing against reading its batches."""
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, [f"store.path={folder / 'store'}", *args.overrides])
    recipe.store.train_tokens = args.batches * recipe.tokens_per_step
    model, tokenizer = load_base_model(recipe)
    build_store(recipe, model, tokenizer, progress=False)
    layers = recipe.lorsa.layers
    batches = list(ActivationStore(recipe.store.path).batches("train"))
    live = ActivationSource(model, layers)
    live_times, store_times = [], []
    for _ in range(args.repeats):
        live_times.append(time_pass(live, batches))
        store = ActivationStore(recipe.store.path)  # nothing verified or cached yet
        store_times.append(time_pass(store.activations(layers), batches))
    tokens = len(batches) * recipe.tokens_per_step
    stored_bytes = sum(p.stat().st_size for p in Path(recipe.store.path).glob("train-*.safetensors"))
    common = {"model": recipe.model.name, "layers": layers, "tokens": tokens, "threads": args.threads,
              "repeats": args.repeats, "store_bytes": stored_bytes}
    results = []
    for name, times in (("recompute", live_times), ("store_read", store_times)):
        seconds = statistics.median(times)
        results.append({"measurement": name, **common, "seconds": seconds, "tokens_per_s": tokens / seconds})
    ratio = statistics.median(live_times) / statistics.median(store_times)
    results.append({"measurement": "ratio", **common, "recompute_over_store_read": ratio})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="smollm2-135m")
    parser.add_argument("--overrides", nargs="*", default=[], help="recipe overrides (lorsa.layers=[18])")
    parser.add_argument("--batches", type=int, default=4, help="training batches stored and timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as folder:
        results = measure(args, Path(folder))
    lines = [json.dumps(result) for result in results]
    print("\n".join(lines))
    if args.json:
        with open(args.json, "a") as handle:
            handle.write("\n".join(lines) + "\n")
    print(f"\n{'measurement':<12} {'seconds':>9} {'tokens/s':>12}")
    for result in results[:2]:
        print(f"{result['measurement']:<12} {result['seconds']:>9.3f} {result['tokens_per_s']:>12.0f}")
    first = results[0]
    print(f"store read is {results[2]['recompute_over_store_read']:.1f}x faster than recomputing "
          f"({first['tokens']} tokens, layers {first['layers']}, {first['store_bytes'] / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
