"""Mistral: `model.layers[i].self_attn`, RMSNorm input, full rotary, grouped-query attention, cache as `cache`,
sliding-window attention on every layer (`config.sliding_window`).

The window reaches a Lorsa through the attention mask transformers builds for eager, sdpa and flex attention,
and through the sliding cache layers that drop the keys older than the window; see `splicing` for the check
that the mask carries it.
"""

from ._base import ArchitectureAdapter
from ._projections import read_separate_projections

ADAPTER = ArchitectureAdapter(
    model_type="mistral",
    model_classes=("MistralForCausalLM", "MistralModel"),
    attention_attribute="self_attn",
    input_norm_attribute="input_layernorm",
    cache_arguments=("past_key_values", "cache"),
    read_attention_weights=read_separate_projections,
)
