"""Configuration of a Lorsa (Low-Rank Sparse Attention) replacement for attention layers."""

from __future__ import annotations

import difflib
import math
import os
from typing import Any

from transformers import GenerationConfig, PreTrainedConfig

ACTIVATIONS = ("topk_abs", "topk_relu")
IMPLEMENTATIONS = ("sparse", "dense")
CACHE_FORMATS = ("values", "inputs", "auto")

POSITIVE_INTEGERS = (
    "hidden_size",
    "num_hidden_layers",
    "base_num_attention_heads",
    "base_num_key_value_heads",
    "base_head_dim",
    "max_position_embeddings",
    "n_ov_heads",
    "n_qk_heads",
    "d_qk_head",
    "top_k",
)
POSITIVE_NUMBERS = ("attn_scale", "qk_norm_eps")
FLAGS = ("rotary_adjacent_pairs", "use_qk_norm")
OPTIONAL_STRINGS = ("base_model_name_or_path", "base_model_revision")

# Keyword arguments `PreTrainedConfig` itself takes besides its fields (and what a saved config.json holds).
_CONFIG_KWARGS = {
    "torch_dtype",
    "num_labels",
    "name_or_path",
    "_name_or_path",
    "_commit_hash",
    "output_attentions",
    "attn_implementation",
    "experts_implementation",
    "transformers_version",
    "model_type",
    "per_layer_config",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
}


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
        base_model_type: `model_type` of the base model (`"gpt_neox"`, `"llama"`, `"mistral"`, `"qwen2"`, `"qwen3"`).
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
        _refuse_unknown_kwargs(kwargs)
        _check_types(self)  # before the defaults below are derived from these values
        _check_positive(self)
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

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> Any:
        """`PreTrainedConfig.from_dict`, refusing a saved Lorsa config that lacks one of the Lorsa's fields
        (a hand-edited config.json would otherwise silently take the default)."""
        if config_dict.get("model_type") == cls.model_type:
            missing = [name for name in _lorsa_fields() if name not in config_dict]
            if missing:
                raise ValueError(
                    f"This Lorsa config.json lacks {', '.join(missing)}: every saved Lorsa config records all "
                    "of its fields. Restore them (re-save the config with LorsaConfig.save_pretrained)."
                )
        return super().from_dict(config_dict, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """`PreTrainedConfig.save_pretrained`, after checking the values again (they may have been assigned)."""
        self._validate()
        super().save_pretrained(save_directory, *args, **kwargs)

    def _validate(self) -> None:
        """Raise at construction, load and save on values no Lorsa can have, naming the field and what it must be:
        a TypeError for a value of the wrong type (`use_qk_norm='false'`), a ValueError for one out of range."""

        def fail(field: str, message: str) -> None:
            raise ValueError(f"LorsaConfig.{field}: {message}")

        _check_types(self)
        _check_positive(self)
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
        for field in POSITIVE_NUMBERS:
            if not getattr(self, field) > 0 or not math.isfinite(getattr(self, field)):
                fail(field, f"must be positive and finite, got {getattr(self, field)!r}")
        if not 0 <= self.initializer_range < math.inf:
            fail("initializer_range", f"must be a finite number >= 0, got {self.initializer_range!r}")
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
        theta = self.rope_parameters["rope_theta"]
        if not _is_number(theta) or not theta > 0:
            fail("rope_parameters", f"rope_theta must be a positive number, got {theta!r}")
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
    def from_base_config(cls, base_config: PreTrainedConfig, layers: list[int] | int, **overrides: Any) -> LorsaConfig:
        """Derive a config for `layers` of a supported base model, with the paper's defaults for the rest.

        Defaults: `d_qk_head` = the base head dimension, `n_qk_heads` = the base number of heads,
        `n_ov_heads` = 8 x hidden size, `top_k` = 64 (capped by `n_ov_heads`), `activation` = `"topk_abs"`,
        rotary settings as the base model's (the same fraction of `d_qk_head` is rotated), `use_qk_norm` (with
        the base's eps) when the base attention normalises q and k itself (Qwen3).
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
        if base.qk_norm_eps is not None:  # the base normalises q and k (Qwen3): so does the Lorsa, by default
            values.update(use_qk_norm=True, qk_norm_eps=base.qk_norm_eps)
        values.update(overrides)
        return cls(**values)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _lorsa_fields() -> list[str]:
    """The fields LorsaConfig declares on top of PreTrainedConfig's."""
    return [name for name in LorsaConfig.__annotations__ if name not in PreTrainedConfig.__annotations__]


def _check_types(config: LorsaConfig) -> None:
    """Raise a TypeError naming the first field whose value has the wrong type."""

    def fail(field: str, expected: str) -> None:
        value = getattr(config, field)
        raise TypeError(f"LorsaConfig.{field}: must be {expected}, got {value!r} ({type(value).__name__})")

    derived = ("base_num_key_value_heads", "base_head_dim", "attn_scale", "rotary_dim", "layers", "rope_parameters")
    for field in POSITIVE_INTEGERS + ("rotary_dim",):
        value = getattr(config, field)
        if (value is not None or field not in derived) and (not isinstance(value, int) or isinstance(value, bool)):
            fail(field, "an integer")
    for field in POSITIVE_NUMBERS + ("initializer_range",):
        value = getattr(config, field)
        if (value is not None or field not in derived) and not _is_number(value):
            fail(field, "a number")
    for field in FLAGS:
        if not isinstance(getattr(config, field), bool):
            fail(field, "true or false (a bool, not a string or number)")
    for field in OPTIONAL_STRINGS:
        if getattr(config, field) is not None and not isinstance(getattr(config, field), str):
            fail(field, "a string or None")
    for field in ("base_model_type", "activation", "implementation", "cache_format"):
        if not isinstance(getattr(config, field), str):
            fail(field, "a string")
    if config.layers is not None and (
        not isinstance(config.layers, list)
        or not all(isinstance(layer, int) and not isinstance(layer, bool) for layer in config.layers)
    ):
        fail("layers", "a list of integer layer indices")
    if config.rope_parameters is not None and not isinstance(config.rope_parameters, dict):
        fail("rope_parameters", "a dict (rope_type, rope_theta, scaling factors)")


def _check_positive(config: LorsaConfig) -> None:
    """Raise a ValueError naming the first integer field that is set and not positive."""
    for field in POSITIVE_INTEGERS:
        value = getattr(config, field)
        if value is not None and value <= 0:
            raise ValueError(f"LorsaConfig.{field}: must be a positive integer, got {value!r}")


def _refuse_unknown_kwargs(kwargs: dict[str, Any]) -> None:
    """Raise on keyword arguments that are neither a field nor one PreTrainedConfig takes (a typo such as
    `n_ov_head=256` would otherwise be kept as a stray attribute and ignored)."""
    allowed = _CONFIG_KWARGS | set(GenerationConfig._get_default_generation_params())
    unknown = [key for key in kwargs if key not in allowed and not key.startswith("_")]
    if unknown:
        fields = [name for name in LorsaConfig.__annotations__ if not name.startswith("_")]
        hints = [difflib.get_close_matches(key, fields, n=1) for key in unknown]
        described = ", ".join(
            f"{key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
            for key, hint in zip(unknown, hints, strict=True)
        )
        raise TypeError(f"LorsaConfig got unknown argument(s) {described}.")


__all__ = ["LorsaConfig"]
