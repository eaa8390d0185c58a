"""What the splicing code needs to know about one base-model architecture."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class BaseAttention:
    """The attention geometry and rotary settings of a base model, read from its config."""

    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int
    rope_parameters: dict[str, Any] = field(default_factory=dict)
    qk_norm_eps: float | None = None
    """Epsilon of the per-head-dim RMS norm the attention applies to q and k (Qwen3); None when it has none."""


@dataclass(frozen=True)
class AttentionWeights:
    """One attention module's weights per head, in `x @ W` orientation (MHSA initialisation of a Lorsa).

    q [n_heads, d, head_dim], k and v [n_kv_heads, d, head_dim], o [n_heads, head_dim, d]; biases None when
    the module has none (q_bias [n_heads, head_dim], k_bias and v_bias [n_kv_heads, head_dim], o_bias [d]);
    q_norm and k_norm [head_dim] the gains of the RMS norm one module shares across its q (k) heads, None when
    it has none.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where the attention module of one architecture lives and how transformers calls it.

    A new architecture is one new module in this package that builds one of these and registers it.
    """

    model_type: str
    model_classes: tuple[str, ...]
    attention_attribute: str
    """Attribute of a decoder layer holding its attention module."""
    input_norm_attribute: str
    """Attribute of a decoder layer holding the norm whose output the attention module receives."""
    cache_arguments: tuple[str, ...]
    """Keyword names under which this architecture's decoder layer passes the KV cache, across 5.x releases."""
    input_norm_has_bias: bool = False
    """Whether that norm is a LayerNorm with a bias (GPT-NeoX) rather than an RMSNorm (Llama): importers that fold
    the norm into a Lorsa trained on the normalised residual need both its gain and its bias."""
    read_attention_weights: Callable[[nn.Module, BaseAttention], AttentionWeights] | None = None
    """Splits an attention module's projections into per-head weights (see `attention_weights`)."""
    final_norm_attribute: str = "norm"
    """Attribute of the bare model holding the norm before the unembedding (logit effects read through it)."""
    has_qk_norm: bool = False
    """Whether the attention module applies its own RMS norm (eps `rms_norm_eps`) to each q and k head before
    rotary (Qwen3). It lives inside the module a Lorsa replaces: a Lorsa's QK-norm is its own, per QK group."""

    def describe(self, config: PreTrainedConfig) -> BaseAttention:
        """Read the attention geometry and rotary settings from a base-model config."""
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        rope_parameters = dict(config.rope_parameters or {})
        partial = rope_parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
        return BaseAttention(
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * (partial if partial is not None else 1.0)),
            rope_parameters=rope_parameters,
            qk_norm_eps=float(config.rms_norm_eps) if self.has_qk_norm else None,
        )

    def sliding_window(self, config: PreTrainedConfig, layer: int) -> int | None:
        """The attention window of `layer` (each query reads only the last `sliding_window` keys), or None for
        full causal attention: Mistral's `sliding_window`, or Qwen2/Qwen3's on the layers `layer_types` marks."""
        window = getattr(config, "sliding_window", None)
        layer_types = getattr(config, "layer_types", None)
        if window is not None and layer_types is not None and layer_types[layer] != "sliding_attention":
            return None
        return window

    def decoder_layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The decoder layers of a base model given as `*ForCausalLM` or as the bare `*Model`."""
        inner = getattr(model, model.base_model_prefix, model)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise TypeError(
                f"{type(model).__name__} has no decoder layers where a {self.model_type} model keeps them; "
                f"pass one of {', '.join(self.model_classes)}."
            )
        return layers

    def get_attention(self, model: PreTrainedModel, layer: int) -> nn.Module:
        return getattr(self.decoder_layers(model)[layer], self.attention_attribute)

    def set_attention(self, model: PreTrainedModel, layer: int, module: nn.Module) -> None:
        setattr(self.decoder_layers(model)[layer], self.attention_attribute, module)

    def get_input_norm(self, model: PreTrainedModel, layer: int) -> nn.Module:
        return getattr(self.decoder_layers(model)[layer], self.input_norm_attribute)

    def get_final_norm(self, model: PreTrainedModel) -> nn.Module:
        """The norm the last residual stream passes before the unembedding."""
        return getattr(getattr(model, model.base_model_prefix, model), self.final_norm_attribute)

    def attention_weights(self, model: PreTrainedModel, layer: int) -> AttentionWeights:
        """The per-head Q/K/V/O weights of the attention module of `layer`, detached, in float32."""
        if self.read_attention_weights is None:
            raise NotImplementedError(f"The {self.model_type} adapter cannot read attention weights per head yet.")
        return self.read_attention_weights(self.get_attention(model, layer), self.describe(model.config))
