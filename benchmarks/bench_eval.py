"""Benchmark: the downstream eval (CE, KL, loss recovered per layer set and condition) as `evaluate_lorsa` runs
it now against the straightforward computation it replaced.

Straightforward: per batch one clean forward and, per layer set and condition (spliced, zero, mean), another
full forward, each turned into float32 log-probabilities, with KL as Σ p (log p − log q). Now
(`lorsa_hf.evals.downstream_metrics`): each condition reruns only the layers from the set's first replaced layer
on the clean run's residual stream there, and CE and KL come from the logits through their log-normaliser, the
clean probabilities built once per batch. Same numbers to float32 tolerance (tests/evals/test_downstream.py).

    python benchmarks/bench_eval.py                         # the embedded SmolLM2-135M, layers 3 18 24
    python benchmarks/bench_eval.py --tiny                  # a tiny random Llama (seconds; no embedded model)

Output: one JSON line per case, then a table. Timings are medians over `--repeats` rounds in which the two
alternate, so that load from other processes falls on both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from lorsa_hf import LorsaConfig, LorsaForReplacement
from lorsa_hf.evals.data import position_mask
from lorsa_hf.evals.downstream import attention_output_means, default_layer_sets, downstream_metrics
from lorsa_hf.evals.replacements import MeanAblation, ZeroAblation, lorsa_replacements, replaced_attention


@torch.no_grad()
def straightforward_downstream(model, replacements, rows, means, exclude) -> tuple[float, int, dict]:
    """A full forward per condition, float32 log-softmax, CE by gather and KL as Σ p (log p − log q): the
    downstream eval as it was computed before. Returns (CE clean, predictions, {(set, condition): (CE, KL)})."""
    layer_sets = default_layer_sets(list(replacements))
    sources = {"spliced": replacements, "zero": {layer: ZeroAblation() for layer in replacements}}
    if means is not None:
        sources["mean"] = {layer: MeanAblation(means[layer]) for layer in replacements}
    sums = {(name, condition): [0.0, 0.0] for name in layer_sets for condition in sources}
    ce_clean, n = 0.0, 0
    for input_ids in rows:
        mask = position_mask(input_ids, exclude)
        counted = mask[:, :-1] & mask[:, 1:]
        targets = input_ids[:, 1:].unsqueeze(-1)
        clean = F.log_softmax(model(input_ids=input_ids, use_cache=False).logits[:, :-1].float(), dim=-1)
        ce_clean += -clean.gather(-1, targets).squeeze(-1)[counted].double().sum().item()
        n += int(counted.sum())
        p_clean = clean.exp()
        for (name, condition), total in sums.items():
            with replaced_attention(model, {layer: sources[condition][layer] for layer in layer_sets[name]}):
                replaced = F.log_softmax(model(input_ids=input_ids, use_cache=False).logits[:, :-1].float(), dim=-1)
            total[0] += -replaced.gather(-1, targets).squeeze(-1)[counted].double().sum().item()
            total[1] += (p_clean * (clean - replaced)).sum(-1)[counted].double().sum().item()
    return ce_clean / n, n, {key: (ce / n, kl / n) for key, (ce, kl) in sums.items()}


def build(args: argparse.Namespace) -> tuple:
    """The base model, a Lorsa on `args.layers` (random weights: timing does not depend on them), eval rows."""
    torch.manual_seed(0)
    if args.tiny:
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        model, layers, vocab = LlamaForCausalLM(config).eval(), [1, 3], 512
    else:
        from lorsa_hf import load_embedded_model

        model, _ = load_embedded_model()
        layers, vocab = args.layers, model.config.vocab_size
    lorsa = LorsaForReplacement(LorsaConfig.from_base_config(model.config, layers=layers)).eval()
    rows = list(torch.randint(3, vocab, (args.tokens // args.seq_len, args.seq_len)).split(args.batch_size))
    for row in rows:
        row[:, 0] = 0
    return model, lorsa, rows


def compare(fast: dict, slow: tuple) -> tuple[float, float]:
    """Largest absolute and relative differences between the two computations' CE and KL values."""
    ce_clean, n, values = slow
    assert fast["n_tokens"] == n
    pairs = [(fast["ce_clean"], ce_clean)]
    for (name, condition), (ce, kl) in values.items():
        entry = fast["layer_sets"][name]
        pairs += [(entry[f"ce_{condition}"], ce), (entry[f"kl_{condition}"], kl)]
    return max(abs(a - b) for a, b in pairs), max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the embedded model")
    parser.add_argument("--layers", type=int, nargs="+", default=[3, 18, 24])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, lorsa, rows = build(args)
    replacements = lorsa_replacements(model, lorsa)
    means, _ = attention_output_means(model, lorsa.config.layers, rows[:1], exclude_token_ids=(0,))
    timings: dict[str, list[float]] = {"straightforward": [], "now": []}
    for _ in range(args.repeats):
        start = time.perf_counter()
        slow = straightforward_downstream(model, replacements, rows, means, (0,))
        timings["straightforward"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fast = downstream_metrics(model, replacements, rows, means=means, exclude_token_ids=(0,))
        timings["now"].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in timings.items()}
    absolute, relative = compare(fast, slow)
    record = {
        "case": "tiny-llama" if args.tiny else "smollm2-135m", "layers": lorsa.config.layers,
        "layer_sets": len(default_layer_sets(lorsa.config.layers)), "tokens": args.tokens, "threads": args.threads,
        "max_absolute_difference": absolute, "max_relative_difference": relative,
        "straightforward_s": medians["straightforward"], "now_s": medians["now"],
        "speedup": medians["straightforward"] / medians["now"], "rounds": timings,
    }
    print(json.dumps(record))
    print()
    print("| case | layers (sets × conditions) | tokens | straightforward s | now s | speed-up | max diff (abs, rel) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {record['case']} | {record['layers']} ({record['layer_sets']} × 3) | {args.tokens:,} | "
        f"{medians['straightforward']:.2f} | {medians['now']:.2f} | {record['speedup']:.2f}× | "
        f"{absolute:.1e}, {relative:.1e} |"
    )


if __name__ == "__main__":
    main()
