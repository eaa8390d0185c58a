"""Configuration of a Lorsa (Low-Rank Sparse Attention) replacement for attention layers."""

from __future__ import annotations

import math
from typing import Any

from transformers import PreTrainedConfig

ACTIVATIONS = ("topk_abs", "topk_relu")
IMPLEMENTATIONS = ("sparse", "dense")
CACHE_FORMATS = ("values", "inputs", "auto")


class LorsaConfig(PreTrainedConfig):
    r"""
    Configuration of a [`LorsaForReplacement`]: one Lorsa layer for each base-model layer in `layers`.

    A Lorsa layer replaces the attention block of a trained transformer with `n_ov_heads` sparsely active
    heads, each reading and writing a single direction. Heads are grouped into `n_qk_heads` QK groups of
    `n_ov_heads // n_qk_heads` consecutive heads that share one query/key projection. Per token only the
    `top_k` heads with the largest score are kept (`activation`):

    - `"topk_abs"`: score `|z| * ||W_O||`, signed `z` kept (the paper's code);
    - `"topk_relu"`: score `relu(z) * ||W_O||`, activation `relu(z)` (the current reference code).

    Build one for a base model with [`LorsaConfig.from_base_config`].

    Args:
        base_model_name_or_path: Hub id or path of the base model the Lorsa was trained for.
        base_model_revision: Revision of the base model.
        base_model_type: `model_type` of the base model (`"gpt_neox"`, `"llama"`).
        hidden_size: Residual stream width `d` of the base model.
        num_hidden_layers: Number of layers of the base model.
        base_num_attention_heads: Attention heads of the base model.
        base_num_key_value_heads: Key/value heads of the base model (grouped-query attention).
        base_head_dim: Head dimension of the base model.
        max_position_embeddings: Context length of the base model (used by scaled rotary variants).
        layers: Base-model layer indices this Lorsa replaces.
        n_ov_heads: Number of Lorsa heads (one value and one output direction each).
        n_qk_heads: Number of QK groups.
        d_qk_head: Query/key dimension of each QK group.
        top_k: Number of heads kept per token.
        activation: Selection rule, `"topk_abs"` or `"topk_relu"`.
        attn_scale: Attention logits are `q.k / attn_scale`; defaults to `sqrt(d_qk_head)`.
        rotary_dim: Number of leading q/k dimensions that get rotary embeddings (0: none).
        rotary_adjacent_pairs: Rotate adjacent pairs (GPT-J style) instead of the two halves (GPT-NeoX/Llama).
        rope_parameters: Rotary frequencies in the transformers format (`rope_type`, `rope_theta`, scaling
            factors), copied from the base model.
        use_qk_norm: Per-group RMS norm on q and k after their bias and before rotary.
        qk_norm_eps: Epsilon of that norm.
        initializer_range: Standard deviation of the random initialisation.
        implementation: `"sparse"` (default): after TopK only the K selected heads are decoded and differentiated
            (docs/method.md §1b); `"dense"`: the reference formulation, a dense decode over all `n_ov` heads and
            a backward through all of them. Both give the same outputs and gradients.
        cache_format: What a transformers `Cache` holds per token besides the keys during generation:
            `"auto"` (default): whichever of the two below is smaller (`"inputs"` whenever `n_ov_heads > hidden_size`);
            `"values"`: the `n_ov` head values, as the base model's attention caches its values;
            `"inputs"`: the layer's input (`d` numbers), from which a decode step recomputes the values exactly.
    """

    model_type = "lorsa"

    base_model_name_or_path: str | None = None
    base_model_revision: str | None = None
    base_model_type: str = "llama"
    hidden_size: int = 768
    num_hidden_layers: int = 12
    base_num_attention_heads: int = 12
    base_num_key_value_heads: int | None = None
    base_head_dim: int | None = None
    max_position_embeddings: int = 2048
    layers: list[int] | None = None
    n_ov_heads: int = 6144
    n_qk_heads: int = 12
    d_qk_head: int = 64
    top_k: int = 64
    activation: str = "topk_abs"
    attn_scale: float | None = None
    rotary_dim: int | None = None
    rotary_adjacent_pairs: bool = False
    rope_parameters: dict[str, Any] | None = None
    use_qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    initializer_range: float = 0.02
    implementation: str = "sparse"
    cache_format: str = "auto"

    def __post_init__(self, **kwargs: Any) -> None:
        if self.layers is None:
            self.layers = [0]
        if self.base_head_dim is None:
            self.base_head_dim = self.hidden_size // self.base_num_attention_heads
        if self.base_num_key_value_heads is None:
            self.base_num_key_value_heads = self.base_num_attention_heads
        if self.attn_scale is None:
            self.attn_scale = math.sqrt(self.d_qk_head)
        if self.rotary_dim is None:
            self.rotary_dim = self.d_qk_head
        if self.rope_parameters is None:
            self.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
        super().__post_init__(**kwargs)
        self._validate()

    def _validate(self) -> None:
        """Raise at construction on values no Lorsa can have, naming the field and what it must be."""

        def fail(field: str, message: str) -> None:
            raise ValueError(f"LorsaConfig.{field}: {message}")

        for field in ("hidden_size", "num_hidden_layers", "n_ov_heads", "n_qk_heads", "d_qk_head", "top_k"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(field, f"must be a positive integer, got {value!r}")
        if self.n_ov_heads % self.n_qk_heads != 0:
            fail(
                "n_ov_heads",
                f"must be divisible by n_qk_heads ({self.n_qk_heads}) so that each QK group has the same "
                f"number of heads, got {self.n_ov_heads}",
            )
        if self.top_k > self.n_ov_heads:
            fail("top_k", f"must be at most n_ov_heads ({self.n_ov_heads}), got {self.top_k}")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.attn_scale > 0:
            fail("attn_scale", f"must be positive, got {self.attn_scale!r}")
        if not 0 <= self.rotary_dim <= self.d_qk_head or self.rotary_dim % 2:
            fail(
                "rotary_dim",
                f"must be an even number between 0 and d_qk_head ({self.d_qk_head}), got {self.rotary_dim}",
            )
        if not self.layers or len(set(self.layers)) != len(self.layers):
            fail("layers", f"must be a non-empty list of distinct layer indices, got {self.layers!r}")
        for layer in self.layers:
            if not isinstance(layer, int) or not 0 <= layer < self.num_hidden_layers:
                fail(
                    "layers",
                    f"index {layer!r} is out of range for a base model with {self.num_hidden_layers} layers "
                    f"(valid: 0..{self.num_hidden_layers - 1})",
                )
        if "rope_type" not in self.rope_parameters or "rope_theta" not in self.rope_parameters:
            fail("rope_parameters", f"must contain 'rope_type' and 'rope_theta', got {self.rope_parameters!r}")
        if self.implementation not in IMPLEMENTATIONS:
            fail("implementation", f"must be one of {IMPLEMENTATIONS}, got {self.implementation!r}")
        if self.cache_format not in CACHE_FORMATS:
            fail("cache_format", f"must be one of {CACHE_FORMATS}, got {self.cache_format!r}")

    @property
    def cached_inputs(self) -> bool:
        """Whether generation caches the layer's input (`d` numbers per token) rather than the `n_ov` values."""
        return self.cache_format == "inputs" or (self.cache_format == "auto" and self.hidden_size < self.n_ov_heads)

    @property
    def ov_group_size(self) -> int:
        """Number of Lorsa heads `g` in one QK group."""
        return self.n_ov_heads // self.n_qk_heads

    @classmethod
    def from_base_config(
        cls, base_config: PreTrainedConfig, layers: list[int] | int, **overrides: Any
    ) -> LorsaConfig:
        """Derive a config for `layers` of a supported base model, with the paper's defaults for the rest.

        Defaults: `d_qk_head` = the base head dimension, `n_qk_heads` = the base number of heads,
        `n_ov_heads` = 8 x hidden size, `top_k` = 64 (capped by `n_ov_heads`), `activation` = `"topk_abs"`,
        rotary settings as the base model's (the same fraction of `d_qk_head` is rotated).
        """
        from .adapters import get_adapter

        adapter = get_adapter(base_config)
        layers = [layers] if isinstance(layers, int) else list(layers)
        base = adapter.describe(base_config)
        d_qk_head = overrides.get("d_qk_head", base.head_dim)
        n_ov_heads = overrides.get("n_ov_heads", 8 * base_config.hidden_size)
        rope_parameters = dict(base.rope_parameters)
        rope_parameters.pop("partial_rotary_factor", None)
        values: dict[str, Any] = dict(
            base_model_name_or_path=getattr(base_config, "_name_or_path", None) or None,
            base_model_type=base_config.model_type,
            hidden_size=base_config.hidden_size,
            num_hidden_layers=base_config.num_hidden_layers,
            base_num_attention_heads=base.num_attention_heads,
            base_num_key_value_heads=base.num_key_value_heads,
            base_head_dim=base.head_dim,
            max_position_embeddings=base_config.max_position_embeddings,
            layers=layers,
            n_ov_heads=n_ov_heads,
            n_qk_heads=base.num_attention_heads,
            d_qk_head=d_qk_head,
            top_k=min(64, n_ov_heads),
            rotary_dim=int(d_qk_head * base.rotary_dim / base.head_dim) // 2 * 2,
            rope_parameters=rope_parameters,
        )
        values.update(overrides)
        return cls(**values)


__all__ = ["LorsaConfig"]
