"""The main job (`lorsa-hf demo`, `make demo`): the shipped Lorsa (`load_pretrained_default`) spliced into the
embedded SmolLM2-135M, evaluated on held-out text and generating beside the clean model. `--train` trains a Lorsa
from scratch instead, `--tiny` splices a random Lorsa into a tiny Llama (no embedded model needed).
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


DEMO_PROMPTS = (
    "Alice was beginning to get very tired of sitting by her sister",
    "To be, or not to be, that is the question:",
    "The capital of France is Paris, and the capital of Italy is",
)
"""Continued with and without the shipped Lorsa by `lorsa-hf demo`."""


def _splice_generate_unsplice(
    model, lorsa: LorsaForReplacement, prompt: torch.Tensor, check_cache: bool = True, new_tokens: int = 24
) -> dict[str, object]:
    """Generate greedily with and without the Lorsa, check the cache (unless `check_cache` is False) and that
    unsplice restores the model."""
    with torch.no_grad():
        clean_logits = model(prompt).logits
        clean = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        lorsa.splice(model, move=True)
        cached = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
        recomputed = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, use_cache=False) if (
            check_cache
        ) else cached
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


def run_train_demo(output_dir: str | Path = "runs/demo", tokens: int = 81_920, eval_tokens: int = 4_096) -> None:
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


DEMO_TASKS = ("lorsa_induction", "lorsa_ioi", "lorsa_successor")


def _summary_rows(results: dict) -> list[list[str]]:
    """One row per layer set: FVU, L0, dead heads, CE, KL and loss recovered (zero ablation)."""
    rows = []
    for name, entry in results["downstream"]["layer_sets"].items():
        recon = results["reconstruction"].get(name)
        fvu, l0, dead = (
            (f"{recon['fvu']:.3f}", f"{recon['l0']:.1f}", f"{recon['dead_fraction']:.1%}") if recon else ("–",) * 3
        )
        label = name if name != "all" else "all (" + ", ".join(map(str, entry["layers"])) + ")"
        rows.append(
            [label, fvu, l0, dead, f"{entry['ce_spliced']:.3f}", f"{entry['kl_spliced']:.4f}",
             f"{entry['loss_recovered_zero']:.3f}"]
        )
    return rows


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))


def _write_generations(path: Path, generations: list[tuple[str, str, str]]) -> None:
    from .io import atomic_write_text

    lines = ["| prompt | clean | all layers spliced |", "| --- | --- | --- |"]
    lines += [f"| {p} | {c} | {s} |".replace("\n", " ") for p, c, s in generations]
    atomic_write_text(path, "\n".join(lines) + "\n")


def run_demo(output_dir: str | Path = "runs/demo", eval_tokens: int = 2_048, lm_eval_limit: int = 20) -> None:
    """The shipped Lorsa in the embedded SmolLM2-135M: the eval suite on `eval_tokens` held-out tokens (and a
    quick lm-eval delta on `lm_eval_limit` documents per task), then three continuations with and without it."""
    from .embedded.model import load_embedded_model
    from .evals import EvalOptions, evaluate_lorsa
    from .shipped import load_pretrained_default, pretrained_default_dir

    output_dir = Path(output_dir)
    print(f"1/3 loading the embedded SmolLM2-135M and the shipped Lorsa ({pretrained_default_dir()})")
    model, tokenizer = load_embedded_model()
    lorsa = load_pretrained_default()
    config = lorsa.config
    print(f"    layers {config.layers}: {config.n_ov_heads:,} heads per layer, top_k {config.top_k}")
    print(f"2/3 evaluating on {eval_tokens:,} held-out tokens, lm-eval on {lm_eval_limit} documents per task")
    options = EvalOptions(
        tasks=DEMO_TASKS, n_tokens=eval_tokens, mean_tokens=0, lm_eval_limit=lm_eval_limit, bootstrap_iters=100,
        progress=False,
    )
    results = evaluate_lorsa(model, lorsa, options, tokenizer=tokenizer, output_dir=output_dir / "eval")
    print("3/3 generating with and without the Lorsa (all layers spliced)")
    generations = []
    for index, text in enumerate(DEMO_PROMPTS):
        prompt = tokenizer(text, return_tensors="pt").input_ids
        run = _splice_generate_unsplice(model, lorsa, prompt, check_cache=index == 0)
        generations.append((text, tokenizer.decode(run["clean"]), tokenizer.decode(run["spliced"])))
        if index == 0:
            checks = run
    _write_generations(output_dir / "eval" / "generations.md", generations)

    print()
    downstream = results["downstream"]
    print(f"held-out: {downstream['n_tokens']:,} predictions, clean CE {downstream['ce_clean']:.3f}")
    _print_table(["layers spliced", "FVU", "L0", "dead", "CE", "KL", "loss rec."], _summary_rows(results))
    for task, metrics in (results["lm_eval"] or {}).get("tasks", {}).items():
        for metric, m in metrics.items():
            print(f"lm-eval {task} {metric}: clean {m['clean']:.3f}, spliced {m['spliced']:.3f} ({m['delta']:+.3f})")
    print()
    for text, clean, spliced in generations:
        print(f"{text!r}\n    clean:   {clean!r}\n    spliced: {spliced!r}")
    print(f"cached generation == recomputing every step: {checks['cache_exact']}")
    print(f"unsplice restores bit-identical logits: {checks['unsplice_exact']}")
    print(f"report: {output_dir / 'eval' / 'report.md'} (continuations: {output_dir / 'eval' / 'generations.md'})")
