"""Qwen2: `model.layers[i].self_attn`, RMSNorm input, full rotary, q/k/v biases (no o bias), grouped-query
attention, cache as `cache`; a sliding window on the layers `layer_types` marks, when `use_sliding_window`."""

from ._base import ArchitectureAdapter
from ._projections import read_separate_projections

ADAPTER = ArchitectureAdapter(
    model_type="qwen2",
    model_classes=("Qwen2ForCausalLM", "Qwen2Model"),
    attention_attribute="self_attn",
    input_norm_attribute="input_layernorm",
    cache_arguments=("past_key_values", "cache"),
    read_attention_weights=read_separate_projections,
)
