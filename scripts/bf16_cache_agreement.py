"""How often cached greedy generation equals recomputation, for the embedded SmolLM2-135M alone and with the
shipped Lorsa spliced into all its layers, in bfloat16 and float32.

A cached step computes the new token's keys and values once and reuses them; recomputation (`use_cache=False`)
recomputes the whole prefix each step. Both are exact in exact arithmetic. In bf16 their roundings differ, and a
Lorsa turns a tiny difference into a different token when two heads sit at the TopK boundary. Prompts: the first
`--prompt-tokens` tokens of the first `--prompts` held-out documents. Prints a JSON line and a table.
Usage: python scripts/bf16_cache_agreement.py [--prompts 12] [--prompt-tokens 24] [--new-tokens 24]
"""

from __future__ import annotations

import argparse
import json

import torch

from lorsa_hf import embedded_corpus, load_embedded_model, load_pretrained_default


def greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=use_cache,
            pad_token_id=0,
        )[0, prompt.shape[1] :]


def agreement(model: torch.nn.Module, prompts: list[torch.Tensor], new_tokens: int) -> dict[str, object]:
    """Prompts whose cached and recomputed continuations are equal, and where the others first differ."""
    first_differences = []
    for prompt in prompts:
        cached, recomputed = (greedy(model, prompt, new_tokens, use_cache) for use_cache in (True, False))
        differ = (cached != recomputed).nonzero()
        first_differences.append(int(differ[0]) if len(differ) else None)
    equal = sum(position is None for position in first_differences)
    return {"equal": equal, "prompts": len(prompts), "first_difference": first_differences}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    results = {}
    for dtype in (torch.bfloat16, torch.float32):
        model, tokenizer = load_embedded_model(dtype=dtype)
        documents = embedded_corpus("heldout")[: args.prompts]
        prompts = [
            torch.tensor([[tokenizer.bos_token_id, *tokenizer(text).input_ids[: args.prompt_tokens - 1]]])
            for text in documents
        ]
        name = str(dtype).removeprefix("torch.")
        results[f"base/{name}"] = agreement(model, prompts, args.new_tokens)
        lorsa = load_pretrained_default(dtype=dtype)
        lorsa.splice(model)
        results[f"spliced/{name}"] = agreement(model, prompts, args.new_tokens)
    print(json.dumps({"new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "results": results}))
    print("| model | dtype | cached = recomputed | first differing new token of the others |")
    print("| --- | --- | --- | --- |")
    for key, value in results.items():
        model_name, dtype_name = key.split("/")
        others = [p for p in value["first_difference"] if p is not None]
        print(f"| {model_name} | {dtype_name} | {value['equal']} of {value['prompts']} | {others or '-'} |")


if __name__ == "__main__":
    main()
