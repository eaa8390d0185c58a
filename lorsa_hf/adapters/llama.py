"""Llama: `model.layers[i].self_attn`, RMSNorm input, full rotary (llama3 scaling), cache as
`past_key_values` (transformers <= 5.23) or `cache` (5.24)."""

from ._base import ArchitectureAdapter
from ._projections import read_separate_projections

ADAPTER = ArchitectureAdapter(
    model_type="llama",
    model_classes=("LlamaForCausalLM", "LlamaModel"),
    attention_attribute="self_attn",
    input_norm_attribute="input_layernorm",
    cache_arguments=("past_key_values", "cache"),
    read_attention_weights=read_separate_projections,
)
