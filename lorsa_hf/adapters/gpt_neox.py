"""GPT-NeoX (Pythia): `gpt_neox.layers[i].attention`, LayerNorm input, partial rotary, cache as `layer_past`."""

from torch import nn

from ._base import ArchitectureAdapter, AttentionWeights, BaseAttention


def _read_attention_weights(attention: nn.Module, base: BaseAttention) -> AttentionWeights:
    """`query_key_value` output is laid out per head as [q_h | k_h | v_h] (head_dim each); `dense` is the O."""
    n, hd = base.num_attention_heads, base.head_dim
    qkv = attention.query_key_value.weight.detach().float()  # [3 d, d]
    d = qkv.shape[1]
    q, k, v = qkv.view(n, 3, hd, d).transpose(-1, -2).unbind(1)  # each [n, d, hd]
    q_bias = k_bias = v_bias = None
    if attention.query_key_value.bias is not None:
        q_bias, k_bias, v_bias = attention.query_key_value.bias.detach().float().view(n, 3, hd).unbind(1)
    o = attention.dense.weight.detach().float().t().reshape(n, hd, d)
    o_bias = attention.dense.bias.detach().float() if attention.dense.bias is not None else None
    return AttentionWeights(
        q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), o=o.contiguous(),
        q_bias=q_bias, k_bias=k_bias, v_bias=v_bias, o_bias=o_bias,
    )


ADAPTER = ArchitectureAdapter(
    model_type="gpt_neox",
    model_classes=("GPTNeoXForCausalLM", "GPTNeoXModel"),
    attention_attribute="attention",
    input_norm_attribute="input_layernorm",
    cache_arguments=("layer_past", "past_key_values", "cache"),
    input_norm_has_bias=True,
    read_attention_weights=_read_attention_weights,
    final_norm_attribute="final_layer_norm",
)
