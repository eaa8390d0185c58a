"""The main job (`lorsa-hf demo`, `make demo`): train a Lorsa on the embedded SmolLM2-135M, evaluate it, and run
the model with it spliced in. `--tiny` splices a random Lorsa into a tiny Llama instead (no embedded model needed).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_lorsa import LorsaConfig
from .modeling_lorsa import LorsaForReplacement
from .splicing import unsplice

DEMO_LAYER = 3


def _splice_generate_unsplice(model, lorsa: LorsaForReplacement, prompt: torch.Tensor) -> dict[str, object]:
    """Generate greedily with and without the Lorsa, check the cache and that unsplice restores the model."""
    with torch.no_grad():
        clean_logits = model(prompt).logits
        clean = model.generate(prompt, max_new_tokens=24, do_sample=False)
        lorsa.splice(model)
        cached = model.generate(prompt, max_new_tokens=24, do_sample=False)
        recomputed = model.generate(prompt, max_new_tokens=24, do_sample=False, use_cache=False)
        unsplice(model)
        restored_logits = model(prompt).logits
    return {
        "clean": clean[0, prompt.shape[1] :],
        "spliced": cached[0, prompt.shape[1] :],
        "cache_exact": torch.equal(cached, recomputed),
        "unsplice_exact": torch.equal(restored_logits, clean_logits),
    }


def run_tiny_demo(seed: int = 0) -> None:
    """A random Lorsa spliced into a tiny random Llama: runs anywhere in seconds."""
    torch.manual_seed(seed)
    base_config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(base_config).eval()
    lorsa = LorsaForReplacement(LorsaConfig.from_base_config(base_config, layers=[0, 1], top_k=16))
    print(
        f"tiny Llama (d={base_config.hidden_size}); random Lorsa on layers {lorsa.config.layers}: "
        f"{lorsa.config.n_ov_heads} heads, {lorsa.config.n_qk_heads} QK groups, top_k {lorsa.config.top_k}"
    )
    run = _splice_generate_unsplice(model, lorsa, torch.randint(3, base_config.vocab_size, (1, 8)))
    print(f"generate() with the Lorsa spliced: {run['spliced'].tolist()}")
    print(f"cached generation == recomputing every step: {run['cache_exact']}")
    print(f"unsplice restores bit-identical logits: {run['unsplice_exact']}")
    with tempfile.TemporaryDirectory() as folder:
        lorsa.save_pretrained(folder)
        reloaded = LorsaForReplacement.from_pretrained(folder)
        pairs = zip(lorsa.state_dict().values(), reloaded.state_dict().values(), strict=True)
        print(f"save_pretrained / from_pretrained round trip exact: {all(torch.equal(a, b) for a, b in pairs)}")


def run_demo(output_dir: str | Path = "runs/demo", tokens: int = 81_920, eval_tokens: int = 4_096) -> None:
    """Train a Lorsa on layer 3 of the embedded SmolLM2-135M for `tokens` tokens (MHSA initialisation, the
    bundled `smollm2-135m` recipe), evaluate it on held-out text, and generate with it spliced in."""
    from .embedded.model import load_embedded_model
    from .evals import EvalOptions, evaluate_lorsa
    from .training import load_recipe, train_from_recipe

    output_dir = Path(output_dir)
    recipe = load_recipe(
        "smollm2-135m",
        [
            f"output_dir={output_dir / 'train'}",
            f"lorsa.layers=[{DEMO_LAYER}]",
            f"training.total_tokens={tokens}",
            f"training.eval_every={tokens}",
            f"training.checkpoint_every={tokens}",
        ],
    )
    print(f"1/3 training a Lorsa on layer {DEMO_LAYER} of SmolLM2-135M for {tokens:,} tokens -> {output_dir / 'train'}")
    metrics = train_from_recipe(recipe, overwrite=True)  # the demo's own folder: a rerun starts again
    final = output_dir / "train" / "final"

    print(f"2/3 evaluating on {eval_tokens:,} held-out tokens -> {output_dir / 'eval'}")
    model, tokenizer = load_embedded_model()
    options = EvalOptions(tasks=None, n_tokens=eval_tokens, mean_tokens=eval_tokens // 4)
    results = evaluate_lorsa(model, final, options, tokenizer=tokenizer, output_dir=output_dir / "eval")
    recon = results["reconstruction"][str(DEMO_LAYER)]
    ce_clean = results["downstream"]["ce_clean"]
    down = results["downstream"]["layer_sets"][str(DEMO_LAYER)]

    print("3/3 generating with the Lorsa spliced in")
    lorsa = LorsaForReplacement.from_pretrained(final)
    prompt = tokenizer("Alice was beginning to get very tired of sitting by her sister", return_tensors="pt")
    run = _splice_generate_unsplice(model, lorsa, prompt.input_ids)

    print()
    print(f"Lorsa: {lorsa.config.n_ov_heads} heads in {lorsa.config.n_qk_heads} QK groups, top_k {lorsa.config.top_k}")
    print(f"held-out during training: FVU {metrics.get('heldout/fvu', float('nan')):.3f}")
    print(
        f"eval ({recon['n_tokens']:,} tokens): FVU {recon['fvu']:.3f}, L0 {recon['l0']:.1f}, "
        f"dead {recon['dead_fraction']:.1%}; CE clean {ce_clean:.3f}, spliced {down['ce_spliced']:.3f}, "
        f"zero-ablated {down['ce_zero']:.3f}; loss recovered {down['loss_recovered_zero']:.3f}; "
        f"KL {down['kl_spliced']:.4f}"
    )
    print(f"clean:   {tokenizer.decode(run['clean'])!r}")
    print(f"spliced: {tokenizer.decode(run['spliced'])!r}")
    print(f"cached generation == recomputing every step: {run['cache_exact']}")
    print(f"unsplice restores bit-identical logits: {run['unsplice_exact']}")
    print(f"report: {output_dir / 'eval' / 'report.md'}")
