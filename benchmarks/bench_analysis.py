"""Benchmark: what reading the heads of one Lorsa layer costs on top of running the model up to that layer.

Streams `--tokens` tokens of the embedded corpus through SmolLM2-135M (the embedded model) with a Lorsa at
`--layer` (a trained one with `--lorsa`, else a random one of the recipe's shape) and times, in rounds that
alternate so that load from other processes falls on all of them alike:

- pack: turning the texts into rows (the same packer the analysis uses);
- forward: the base model up to the layer plus the Lorsa layer on those rows, stopped after it;
- analysis: `analyze_corpus`, i.e. pack + forward + the store's bookkeeping (top-N, sample, counts).

The overhead is analysis / (pack + forward) - 1 (the target: at most 25%). Output: one JSON line, then a table.

    python benchmarks/bench_analysis.py --tokens 65536
    python benchmarks/bench_analysis.py --lorsa runs/demo/train/final --layer 3 --tokens 1048576
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time

import torch

from lorsa_hf import LorsaConfig, LorsaForReplacement, embedded_corpus, load_embedded_model
from lorsa_hf.analysis import CorpusOptions, analyze_corpus
from lorsa_hf.analysis.reading import LayerReader, spliced_at
from lorsa_hf.training import ListTextSource, SequencePacker


def packed_rows(texts: list[str], tokenizer, options: CorpusOptions) -> list[tuple[list[int], list[int]]]:
    return list(itertools.islice(SequencePacker(ListTextSource(texts), tokenizer, options.seq_len), options.n_rows))


def forward_only(model, lorsa, layer: int, rows, batch_size: int) -> None:
    with spliced_at(model, lorsa, layer) as module:
        reader = LayerReader(model, module)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            reader(torch.tensor([r for r, _ in chunk]), torch.tensor([m for _, m in chunk]))


def timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lorsa", default=None, help="a trained Lorsa folder (default: a random one)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tokenizer = load_embedded_model()
    if args.lorsa:
        lorsa = LorsaForReplacement.from_pretrained(args.lorsa)
    else:
        lorsa = LorsaForReplacement(LorsaConfig.from_base_config(model.config, layers=[args.layer]))
    texts = embedded_corpus("train")
    options = CorpusOptions(seq_len=args.seq_len, n_tokens=args.tokens, batch_size=args.batch_size)
    rows = packed_rows(texts, tokenizer, options)
    times: dict[str, list[float]] = {"pack": [], "forward": [], "analysis": []}
    for _ in range(args.repeats):
        times["pack"].append(timed(lambda: packed_rows(texts, tokenizer, options)))
        times["forward"].append(timed(lambda: forward_only(model, lorsa, args.layer, rows, args.batch_size)))
        times["analysis"].append(timed(lambda: analyze_corpus(
            model, lorsa, args.layer, texts, tokenizer, options, top_n=args.top_n, progress=False
        )))
    median = {name: statistics.median(values) for name, values in times.items()}
    baseline = median["pack"] + median["forward"]
    result = {
        "benchmark": "analysis_overhead", "model": "SmolLM2-135M (embedded)", "layer": args.layer,
        "lorsa": args.lorsa or "random", "n_ov_heads": lorsa.config.n_ov_heads, "top_k": lorsa.config.top_k,
        "tokens": len(rows) * args.seq_len, "threads": args.threads, "repeats": args.repeats,
        "pack_s": median["pack"], "forward_s": median["forward"], "analysis_s": median["analysis"],
        "overhead": median["analysis"] / baseline - 1.0,
    }
    print(json.dumps(result), flush=True)
    print(f"\n{'step':<34}{'seconds':>10}{'tok/s':>12}")
    for name, label in (("pack", "pack rows"), ("forward", "model to layer + Lorsa layer"),
                        ("analysis", "analysis (all of it)")):
        print(f"{label:<34}{median[name]:>10.2f}{result['tokens'] / median[name]:>12,.0f}")
    print(f"{'overhead over pack + forward':<34}{100 * result['overhead']:>9.1f}%  (target: at most 25%)")


if __name__ == "__main__":
    main()
