"""Benchmark: what reading the heads of one Lorsa layer costs on top of running the model up to that layer.

Streams `--tokens` tokens of the embedded corpus through SmolLM2-135M (the embedded model) with a Lorsa at
`--layer` (a trained one with `--lorsa`, else a random one of the recipe's shape), batch by batch as
`analyze_corpus` does, and times each batch's two parts side by side, so that load from other processes falls
on both alike:

- forward: the base model up to the layer plus the Lorsa layer, stopped after it (with the packing of the rows);
- bookkeeping: the store's update (top-N, sample, counts, rows).

The overhead is bookkeeping / forward (the target: at most 25%), over the whole pass and over its second half:
the store's first batches cost most, while every head's table fills. Output: one JSON line, then a table.

    python benchmarks/bench_analysis.py --tokens 65536
    python benchmarks/bench_analysis.py --lorsa runs/demo/train/final --layer 3 --tokens 1048576
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from lorsa_hf import LorsaConfig, LorsaForReplacement, embedded_corpus, load_embedded_model
from lorsa_hf.analysis import CorpusOptions, HeadActivationStore
from lorsa_hf.analysis.reading import LayerReader, spliced_at
from lorsa_hf.analysis.stream import counted_positions
from lorsa_hf.training import ListTextSource, SequencePacker


def packed_rows(texts: list[str], tokenizer, options: CorpusOptions) -> list[tuple[list[int], list[int]]]:
    return list(itertools.islice(SequencePacker(ListTextSource(texts), tokenizer, options.seq_len), options.n_rows))


def timed_pass(model, lorsa, layer: int, texts, tokenizer, options: CorpusOptions, top_n: int) -> list[tuple]:
    """(forward seconds, bookkeeping seconds) per batch of one pass, the loop of `analyze_corpus`."""
    started = time.perf_counter()
    rows = packed_rows(texts, tokenizer, options)
    pack = time.perf_counter() - started
    store = HeadActivationStore.create(lorsa.config.n_ov_heads, layer, top_n=top_n)
    exclude = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    times = []
    with spliced_at(model, lorsa, layer) as module:
        reader = LayerReader(model, module)
        for start in range(0, len(rows), options.batch_size):
            chunk = rows[start : start + options.batch_size]
            ids, mask = torch.tensor([r for r, _ in chunk]), torch.tensor([m for _, m in chunk])
            started = time.perf_counter()
            output = reader(ids, mask).output
            forward = time.perf_counter() - started
            started = time.perf_counter()
            row_ids = torch.arange(start, start + len(chunk))
            counted = counted_positions(ids, mask, exclude)
            store.update(ids, row_ids, counted, output.top_k_values, output.top_k_indices)
            times.append((forward + pack * len(chunk) / len(rows), time.perf_counter() - started))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lorsa", default=None, help="a trained Lorsa folder (default: a random one)")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=1_048_576)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-n", type=int, default=16)
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
    times = timed_pass(model, lorsa, args.layer, texts, tokenizer, options, args.top_n)
    forward, bookkeeping = (sum(column) for column in zip(*times, strict=True))
    second = times[len(times) // 2 :]
    forward_late, bookkeeping_late = (sum(column) for column in zip(*second, strict=True))
    result = {
        "benchmark": "analysis_overhead", "model": "SmolLM2-135M (embedded)", "layer": args.layer,
        "lorsa": args.lorsa or "random", "n_ov_heads": lorsa.config.n_ov_heads, "top_k": lorsa.config.top_k,
        "tokens": len(times) * args.batch_size * args.seq_len, "batches": len(times), "threads": args.threads,
        "forward_s": forward, "bookkeeping_s": bookkeeping, "overhead": bookkeeping / forward,
        "overhead_second_half": bookkeeping_late / forward_late,
    }
    print(json.dumps(result), flush=True)
    print(f"\n{'part':<42}{'seconds':>10}{'tok/s':>12}")
    print(f"{'pack + model to layer + Lorsa layer':<42}{forward:>10.2f}{result['tokens'] / forward:>12,.0f}")
    print(f"{'bookkeeping (store updates)':<42}{bookkeeping:>10.2f}")
    print(f"{'overhead, whole pass':<42}{100 * result['overhead']:>9.1f}%  (target: at most 25%)")
    print(f"{'overhead, second half of the pass':<42}{100 * result['overhead_second_half']:>9.1f}%")


if __name__ == "__main__":
    main()
