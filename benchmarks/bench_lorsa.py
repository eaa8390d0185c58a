"""Benchmark: the fast (sparse) Lorsa path against the dense reference path and the base model's own attention.

In one process and one run, for a Pythia-160M-, a SmolLM2-135M- and a Llama-3.1-8B-sized layer (the last at a
reduced sequence length), it times forward, forward+backward (fp32 and bf16 autocast) and a cached decode step
for each path, measures a training step's peak memory, the machine's matmul rate and the fraction of it the
dense-FLOP part (the matmuls and the attention) reaches, and the decode step of a whole generation with every
layer spliced against the base model's. Output: one JSON line per measurement, then a readable table.

    python benchmarks/bench_lorsa.py                        # all cases, 2 threads
    python benchmarks/bench_lorsa.py --cases pythia-160m --repeats 9 --json results.jsonl

Timings are medians over `--repeats` rounds in which the paths alternate, so that load from other processes
falls on all of them alike.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from measure import Recorder, count_flops, dense_part_profile, matmul_rate, median_times, peak_bytes
from transformers import DynamicCache, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

from lorsa_hf import LorsaConfig, LorsaForReplacement


@dataclass
class Case:
    """One layer size: the base attention it replaces and the Lorsa that replaces it."""

    name: str
    arch: str
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    intermediate_size: int
    vocab_size: int
    n_ov: int
    n_qk: int
    d_qk: int
    top_k: int
    batch: int
    seq: int
    decode_context: int
    model_decode: bool


CASES = {
    case.name: case
    for case in (
        Case("pythia-160m", "gpt_neox", 768, 12, 12, 64, 12, 3072, 50304, 6144, 48, 64, 64, 2, 256, 256, True),
        Case("smollm2-135m", "llama", 576, 9, 3, 64, 30, 1536, 49152, 4608, 9, 64, 64, 2, 256, 256, True),
        Case("llama-3.1-8b", "llama", 4096, 32, 8, 128, 32, 14336, 128256, 32768, 32, 128, 64, 1, 64, 64, False),
    )
}

def base_config(case: Case, layers: int):
    if case.arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=case.vocab_size, hidden_size=case.hidden_size, num_hidden_layers=layers,
            num_attention_heads=case.heads, intermediate_size=case.intermediate_size, rotary_pct=0.25,
            max_position_embeddings=2048, attn_implementation="sdpa",
        )
    return LlamaConfig(
        vocab_size=case.vocab_size, hidden_size=case.hidden_size, num_hidden_layers=layers,
        num_attention_heads=case.heads, num_key_value_heads=case.kv_heads, head_dim=case.head_dim,
        intermediate_size=case.intermediate_size, max_position_embeddings=2048, attn_implementation="sdpa",
    )


def base_model(case: Case, layers: int):
    torch.manual_seed(0)
    model_class = GPTNeoXForCausalLM if case.arch == "gpt_neox" else LlamaForCausalLM
    return model_class(base_config(case, layers)).eval()


def lorsa_for(case: Case, config, layers: list[int]) -> LorsaForReplacement:
    lorsa_config = LorsaConfig.from_base_config(
        config, layers=layers, n_ov_heads=case.n_ov, n_qk_heads=case.n_qk, d_qk_head=case.d_qk, top_k=case.top_k
    )
    torch.manual_seed(1)
    return LorsaForReplacement(lorsa_config)


class LayerBench:
    """One case's layer: the base attention module, the Lorsa layer that replaces it, their inputs, and the calls
    that run either on them."""

    variants = ("sparse", "dense", "base")

    def __init__(self, case: Case) -> None:
        self.case = case
        config = base_config(case, 1)
        base = base_model(case, 1) if case.model_decode else None
        if base is None:
            from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

            self.attention, self.rotary = LlamaAttention(config, layer_idx=0).eval(), LlamaRotaryEmbedding(config)
        else:
            backbone = base.gpt_neox if case.arch == "gpt_neox" else base.model
            layer = backbone.layers[0]
            self.attention = layer.attention if case.arch == "gpt_neox" else layer.self_attn
            self.rotary = backbone.rotary_emb
        self.layer = lorsa_for(case, config, [0]).layer(0)
        self.cache_argument = next(name for name in ("layer_past", "cache", "past_key_values")
                                   if name in inspect.signature(self.attention.forward).parameters)
        self.x = torch.randn(case.batch, case.seq, case.hidden_size)
        self.target = torch.randn(case.batch, case.seq, case.hidden_size)
        position_ids = torch.arange(case.seq)[None].expand(case.batch, -1)
        self.position_embeddings = self.rotary(self.x, position_ids)
        self.tokens = case.batch * case.seq

    def module(self, variant: str) -> torch.nn.Module:
        return self.attention if variant == "base" else self.layer

    def run(self, variant: str, inputs: torch.Tensor, embeddings, cache=None) -> torch.Tensor:
        if variant == "base":
            kwargs = {"position_embeddings": embeddings, "attention_mask": None, self.cache_argument: cache}
            return self.attention(inputs, **kwargs)[0]
        self.layer.config.implementation = variant
        return self.layer(inputs, position_embeddings=embeddings, cache=cache).hidden_states

    def forward(self, variant: str, autocast: bool) -> Callable[[], object]:
        def call():
            context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
            with torch.no_grad(), context:
                self.run(variant, self.x, self.position_embeddings)
        return call

    def train_step(self, variant: str, autocast: bool) -> Callable[[], object]:
        module = self.module(variant)

        def call():
            for parameter in module.parameters():
                parameter.grad = None
            context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
            with context:
                output = self.run(variant, self.x, self.position_embeddings)
            torch.nn.functional.mse_loss(output.float(), self.target).backward()
        return call


def timed_benchmarks(
    bench: LayerBench, recorder: Recorder, repeats: int, rates: dict[str, float], bf16: bool = True
) -> None:
    """Forward and training step of each variant, in fp32 and (`bf16`) under bf16 autocast: times, FLOP rates."""
    for op, make, autocast in (
        ("forward", bench.forward, False),
        ("forward", bench.forward, True),
        ("train_step", bench.train_step, False),
        ("train_step", bench.train_step, True),
    ):
        if autocast and not bf16:
            continue
        functions = {variant: make(variant, autocast) for variant in bench.variants}
        times = median_times(functions, repeats)
        for variant in bench.variants:
            flops = count_flops(functions[variant])
            seconds = statistics.median(times[variant])
            rate = rates["bf16" if autocast else "fp32"]
            recorder.add(
                case=bench.case.name, variant=variant, op=op, dtype="bf16-autocast" if autocast else "fp32",
                median_s=seconds, min_s=min(times[variant]), tokens_per_s=bench.tokens / seconds, flops=flops,
                achieved_gflops=flops / seconds / 1e9, fraction_of_matmul_rate=flops / seconds / rate,
            )


def peak_memory_benchmarks(bench: LayerBench, recorder: Recorder) -> None:
    """Peak memory of a training step, above the model state (parameters, and gradients kept allocated as in
    steady training)."""
    for variant in bench.variants:
        step = bench.train_step(variant, False)
        step()
        module = bench.module(variant)
        grads = [parameter.grad for parameter in module.parameters()]

        def keep_grads_step(module=module, grads=grads, variant=variant):
            for parameter, grad in zip(module.parameters(), grads, strict=True):
                parameter.grad = grad.zero_()
            output = bench.run(variant, bench.x, bench.position_embeddings)
            torch.nn.functional.mse_loss(output.float(), bench.target).backward()

        recorder.add(case=bench.case.name, variant=variant, op="train_step_peak_memory", dtype="fp32",
                     peak_bytes=peak_bytes(keep_grads_step))
        for parameter in module.parameters():
            parameter.grad = None


def profile_benchmarks(bench: LayerBench, recorder: Recorder, bf16: bool = True) -> None:
    """The dense-FLOP part: FLOPs of the matmuls over the time spent in them, from a profile, against the matmul
    rate measured right before it (other processes on a shared machine change both alike)."""
    for variant in ("sparse", "dense"):
        for autocast in (False, True) if bf16 else (False,):
            rate = matmul_rate(torch.bfloat16 if autocast else torch.float32)
            flops, seconds, total, top = dense_part_profile(bench.train_step(variant, autocast))
            recorder.add(
                case=bench.case.name, variant=variant, op="train_step_profile",
                dtype="bf16-autocast" if autocast else "fp32", matmul_flops=flops, matmul_s=seconds,
                profiled_s=total, matmul_rate_now=rate,
                matmul_fraction_of_matmul_rate=flops / seconds / rate if seconds else 0.0,
                top_ops=[[name, round(value, 5)] for name, value in top],
            )


def bf16_error_benchmark(bench: LayerBench, recorder: Recorder) -> None:
    """bf16 autocast vs fp32 on the same weights and inputs."""
    layer, x, embeddings = bench.layer, bench.x, bench.position_embeddings
    with torch.no_grad():
        layer.config.implementation = "sparse"
        reference = layer(x, position_embeddings=embeddings, output_activations=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = layer(x, position_embeddings=embeddings, output_activations=True)
    kept = (low.top_k_indices[..., :, None] == reference.top_k_indices[..., None, :]).any(-1)  # [B, T, K]
    difference = low.hidden_states.float() - reference.hidden_states
    error = difference.norm() / reference.hidden_states.norm()
    same_rows = kept.all(-1)  # tokens whose selection bf16 left unchanged: the error of the arithmetic alone
    same_error = difference[same_rows].norm() / reference.hidden_states[same_rows].norm()
    recorder.add(case=bench.case.name, variant="sparse", op="bf16_autocast_error", dtype="bf16-autocast",
                 relative_error=error.item(), selection_overlap=kept.float().mean().item(),
                 tokens_with_same_selection=same_rows.float().mean().item(),
                 relative_error_same_selection=same_error.item())


def decode_step_benchmark(bench: LayerBench, recorder: Recorder, repeats: int) -> None:
    """One cached decode step after `decode_context` tokens: sparse with an input cache, dense with a value cache."""
    case, layer = bench.case, bench.layer
    context = bench.x[:1, : case.decode_context]
    step_input = torch.randn(1, 1, case.hidden_size)
    step_embeddings = bench.rotary(step_input, torch.tensor([[case.decode_context]]))
    context_embeddings = bench.rotary(context, torch.arange(case.decode_context)[None])

    def use(variant: str) -> None:
        if variant != "base":
            layer.config.implementation = variant
            layer.config.cache_format = "inputs" if variant == "sparse" else "values"

    caches = {}
    with torch.no_grad():
        for variant in bench.variants:
            use(variant)
            caches[variant] = DynamicCache()
            bench.run(variant, context, context_embeddings, caches[variant])

    def decode_step(variant: str) -> Callable[[], object]:
        def call():
            use(variant)
            with torch.no_grad():
                bench.run(variant, step_input, step_embeddings, caches[variant])
            caches[variant].crop(-1)
        return call

    functions = {variant: decode_step(variant) for variant in bench.variants}
    times = median_times(functions, max(repeats, 9))
    for variant in bench.variants:
        cache_layer = caches[variant].layers[0]
        per_token = sum(t.shape[1] * t.shape[-1] for t in (cache_layer.keys, cache_layer.values))
        recorder.add(case=case.name, variant=variant, op="decode_step", dtype="fp32", context=case.decode_context,
                     median_s=statistics.median(times[variant]), min_s=min(times[variant]),
                     flops=count_flops(functions[variant]), cache_numbers_per_token=per_token)
    layer.config.cache_format = "values"


def layer_benchmarks(case: Case, recorder: Recorder, repeats: int, rates: dict[str, float], bf16: bool = True) -> None:
    """Every measurement of one case's layer, in an order that keeps the random inputs of each the same."""
    bench = LayerBench(case)
    for parameter in bench.attention.parameters():
        parameter.requires_grad_(True)
    timed_benchmarks(bench, recorder, repeats, rates, bf16)
    peak_memory_benchmarks(bench, recorder)
    profile_benchmarks(bench, recorder, bf16)
    if bf16:
        bf16_error_benchmark(bench, recorder)
    decode_step_benchmark(bench, recorder, repeats)


def model_decode_benchmark(case: Case, recorder: Recorder, repeats: int) -> None:
    """Decode step of a generation: base model vs the same model with every layer spliced."""
    model = base_model(case, case.layers)
    lorsa = lorsa_for(case, model.config, list(range(case.layers)))
    prompt = torch.randint(0, case.vocab_size, (1, case.decode_context), generator=torch.Generator().manual_seed(0))
    step_token = torch.randint(0, case.vocab_size, (1, 1), generator=torch.Generator().manual_seed(1))
    # the cache's name in the model's forward and output: `cache` from transformers 5.24, `past_key_values` before
    model_cache_argument = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    times: dict[str, list[float]] = {}
    cache_numbers: dict[str, int] = {}
    variants = (("base", None, None), ("sparse", "sparse", "inputs"), ("dense", "dense", "values"))
    for round_index in range(repeats + 1):
        for variant, implementation, cache_format in variants:
            if implementation is not None:
                lorsa.config.implementation, lorsa.config.cache_format = implementation, cache_format
                lorsa.splice(model)
            with torch.no_grad():
                output = model(prompt, use_cache=True)
                cache = output[model_cache_argument]
                cached = {model_cache_argument: cache}
                model(step_token, **cached, use_cache=True)  # the first step after a prefill is slow
                cache.crop(-1)
                for _ in range(3):
                    start = time.perf_counter()
                    model(step_token, **cached, use_cache=True)
                    elapsed = time.perf_counter() - start
                    cache.crop(-1)
                    if round_index > 0:
                        times.setdefault(variant, []).append(elapsed)
            first = cache.layers[0]
            cache_numbers[variant] = sum(t.shape[1] * t.shape[-1] for t in (first.keys, first.values))
            if implementation is not None:
                lorsa.unsplice(model)
    for variant, _, _ in variants:
        recorder.add(case=case.name, variant=variant, op="model_decode_step", dtype="fp32",
                     context=case.decode_context, layers_spliced=0 if variant == "base" else case.layers,
                     median_s=statistics.median(times[variant]), min_s=min(times[variant]),
                     cache_numbers_per_token_per_layer=cache_numbers[variant])


def print_table(rows: list[dict], rates: dict[str, float]) -> None:
    print(f"\nmatmul rate: fp32 {rates['fp32'] / 1e9:.0f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    timed = {(r["case"], r["op"], r["dtype"], r["variant"]): r for r in rows if "median_s" in r}
    header = (f"{'case':14} {'op':18} {'dtype':14} {'sparse s':>9} {'dense s':>9} {'base s':>9} "
              f"{'dense/sparse':>12} {'(of minima)':>11} {'sparse/base':>11}")
    print(header)
    print("-" * len(header))
    for case, op, dtype in dict.fromkeys((r["case"], r["op"], r["dtype"]) for r in rows if "median_s" in r):
        get = {v: timed.get((case, op, dtype, v), {}).get("median_s") for v in ("sparse", "dense", "base")}
        low = {v: timed.get((case, op, dtype, v), {}).get("min_s") for v in ("sparse", "dense")}
        ratio = f"{get['dense'] / get['sparse']:.2f}x" if get["dense"] and get["sparse"] else "-"
        # noise from other processes only adds time, so the ratio of the fastest rounds is the steadier one
        ratio_of_minima = f"{low['dense'] / low['sparse']:.2f}x" if low["dense"] and low["sparse"] else "-"
        versus_base = f"{get['sparse'] / get['base']:.2f}x" if get["base"] and get["sparse"] else "-"
        cells = [f"{get[v]:9.4f}" if get[v] else f"{'-':>9}" for v in ("sparse", "dense", "base")]
        print(f"{case:14} {op:18} {dtype:14} {' '.join(cells)} {ratio:>12} {ratio_of_minima:>11} {versus_base:>11}")
    fp32_dense = {(r["case"]): r["median_s"] for r in rows
                  if r.get("op") == "train_step" and r["dtype"] == "fp32" and r["variant"] == "dense"}
    print("\ntraining step, sparse bf16 autocast vs dense fp32:")
    for r in rows:
        if r.get("op") == "train_step" and r["dtype"] == "bf16-autocast" and r["variant"] == "sparse":
            print(f"  {r['case']:14} {fp32_dense[r['case']] / r['median_s']:.2f}x")
    print("\npeak memory of a training step above parameters and gradients (MiB):")
    for r in rows:
        if r.get("op") == "train_step_peak_memory":
            print(f"  {r['case']:14} {r['variant']:7} {r['peak_bytes'] / 2**20:9.1f}")
    print("\ndense-FLOP part (matmuls) of a training step, fraction of the matmul rate:")
    for r in rows:
        if r.get("op") == "train_step_profile":
            print(f"  {r['case']:14} {r['variant']:7} {r['dtype']:14} {r['matmul_fraction_of_matmul_rate']:.2f} "
                  f"({r['matmul_s'] / r['profiled_s']:.0%} of the step in matmuls); top ops: "
                  + ", ".join(f"{name} {seconds * 1e3:.1f}ms" for name, seconds in r["top_ops"][:5]))
    print("\nbf16 autocast vs fp32 (sparse path): relative output error; share of selected heads kept; share of "
          "tokens with the same selection and the error on those tokens:")
    for r in rows:
        if r.get("op") == "bf16_autocast_error":
            print(f"  {r['case']:14} {r['relative_error']:.4f} {r['selection_overlap']:.3f} "
                  f"{r['tokens_with_same_selection']:.3f} {r['relative_error_same_selection']:.4f}")
    print("\ncache numbers per token per layer:")
    for r in rows:
        if "cache_numbers_per_token_per_layer" in r or "cache_numbers_per_token" in r:
            value = r.get("cache_numbers_per_token_per_layer", r.get("cache_numbers_per_token"))
            print(f"  {r['case']:14} {r['op']:18} {r['variant']:7} {value}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the JSON lines to this file")
    parser.add_argument("--no-model-decode", action="store_true", help="skip the whole-model decode step")
    parser.add_argument("--no-bf16", action="store_true",
                        help="skip bf16 autocast (for CPUs without bf16 matmuls, where it takes hours)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recorder = Recorder(args.json)
    rates = {"fp32": matmul_rate(torch.float32), "bf16": matmul_rate(torch.bfloat16)}
    recorder.add(op="matmul_rate", threads=args.threads, fp32_flops_per_s=rates["fp32"], bf16_flops_per_s=rates["bf16"],
                 torch=torch.__version__, python=sys.version.split()[0])
    for name in args.cases:
        case = CASES[name]
        layer_benchmarks(case, recorder, args.repeats, rates, bf16=not args.no_bf16)
        if case.model_decode and not args.no_model_decode:
            model_decode_benchmark(case, recorder, args.repeats)
    print_table(recorder.rows, rates)


if __name__ == "__main__":
    main()
