"""Qwen3: `model.layers[i].self_attn`, RMSNorm input, full rotary, no attention biases, cache as `cache`.

Its attention module applies an RMS norm with one gain [head_dim] to every q and every k head before rotary.
That norm is part of the module a Lorsa replaces; a Lorsa's QK-norm is its own ([n_qk, d_qk] gains, its eps).
"""

from ._base import ArchitectureAdapter
from ._projections import read_separate_projections

ADAPTER = ArchitectureAdapter(
    model_type="qwen3",
    model_classes=("Qwen3ForCausalLM", "Qwen3Model"),
    attention_attribute="self_attn",
    input_norm_attribute="input_layernorm",
    cache_arguments=("past_key_values", "cache"),
    read_attention_weights=read_separate_projections,
    has_qk_norm=True,
)
