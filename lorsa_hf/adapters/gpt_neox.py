"""GPT-NeoX (Pythia): `gpt_neox.layers[i].attention`, LayerNorm input, partial rotary, cache as `layer_past`."""

from ._base import ArchitectureAdapter

ADAPTER = ArchitectureAdapter(
    model_type="gpt_neox",
    model_classes=("GPTNeoXForCausalLM", "GPTNeoXModel"),
    attention_attribute="attention",
    input_norm_attribute="input_layernorm",
    cache_arguments=("layer_past", "past_key_values", "cache"),
)
