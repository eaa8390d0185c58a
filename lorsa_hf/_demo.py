"""The main job until a trained Lorsa and the embedded model exist: a random Lorsa spliced into a tiny Llama."""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from .configuration_lorsa import LorsaConfig
from .modeling_lorsa import LorsaForReplacement
from .splicing import unsplice


def run_demo(seed: int = 0) -> None:
    torch.manual_seed(seed)
    base_config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128,
    )
    model = LlamaForCausalLM(base_config).eval()
    lorsa = LorsaForReplacement(LorsaConfig.from_base_config(base_config, layers=[0, 1], top_k=16))
    print(f"base: tiny Llama, d={base_config.hidden_size}, {base_config.num_hidden_layers} layers")
    print(
        f"lorsa: layers {lorsa.config.layers}, {lorsa.config.n_ov_heads} heads in {lorsa.config.n_qk_heads} QK groups "
        f"of d_qk {lorsa.config.d_qk_head}, top_k {lorsa.config.top_k}, {lorsa.config.activation}"
    )
    prompt = torch.randint(3, base_config.vocab_size, (1, 8))
    with torch.no_grad():
        clean_logits = model(prompt).logits
        lorsa.splice(model)
        spliced_logits = model(prompt).logits
        cached = model.generate(prompt, max_new_tokens=12, do_sample=False)
        uncached = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
        unsplice(model)
        restored_logits = model(prompt).logits
    print(f"spliced forward ran: max |logit change| vs clean = {(spliced_logits - clean_logits).abs().max():.4f}")
    print(f"generate() with KV cache: {cached[0, prompt.shape[1]:].tolist()}")
    print(f"cached == recomputed each step: {torch.equal(cached, uncached)}")
    print(f"unsplice restores bit-identical logits: {torch.equal(restored_logits, clean_logits)}")
    with tempfile.TemporaryDirectory() as folder:
        lorsa.save_pretrained(folder)
        reloaded = LorsaForReplacement.from_pretrained(folder)
        pairs = zip(lorsa.state_dict().values(), reloaded.state_dict().values(), strict=True)
        same = all(torch.equal(a, b) for a, b in pairs)
    print(f"save_pretrained / from_pretrained round trip exact: {same}")
