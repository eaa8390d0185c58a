"""Score every attention head of the embedded SmolLM2-135M for induction, to choose the Lorsa's middle layer.

On BOS + a random token sequence repeated twice, an induction head at a query in the second copy attends to the
token after the previous occurrence of the current token; its score is that attention weight, averaged over the
second copy's queries and the batch. Prints a JSON line (the scores, [layer][head]) and a table of each layer's
best head. Usage: python scripts/base_induction_scores.py [--batch 8] [--length 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import json

import torch

from lorsa_hf import load_embedded_model


def induction_scores(
    model: torch.nn.Module, bos_token_id: int, batch: int, length: int, seed: int
) -> list[list[float]]:
    """[layer][head] mean attention from each second-copy query to the token after its first occurrence."""
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    tokens = torch.randint(1000, vocab - 1000, (batch, length), generator=generator)
    ids = torch.cat([torch.full((batch, 1), bos_token_id), tokens, tokens], 1)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
    queries = torch.arange(1 + length, 2 * length)
    keys = queries - length + 1
    return [pattern[:, :, queries, keys].mean((0, 2)).tolist() for pattern in attentions]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model, tokenizer = load_embedded_model()
    model.set_attn_implementation("eager")
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else 0
    scores = induction_scores(model, bos, args.batch, args.length, args.seed)
    print(json.dumps({"induction_scores": scores}))
    print("| layer | best head | score |\n| --- | --- | --- |")
    for layer, row in enumerate(scores):
        best = max(range(len(row)), key=row.__getitem__)
        print(f"| {layer} | {best} | {row[best]:.3f} |")


if __name__ == "__main__":
    main()
