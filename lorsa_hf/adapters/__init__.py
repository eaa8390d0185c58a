"""One adapter per supported base-model architecture, looked up by `model_type`."""

from __future__ import annotations

from transformers import PreTrainedConfig, PreTrainedModel

from . import gpt_neox, llama, mistral, qwen2, qwen3
from ._base import ArchitectureAdapter, AttentionWeights, BaseAttention

ADAPTERS: dict[str, ArchitectureAdapter] = {
    module.ADAPTER.model_type: module.ADAPTER for module in (gpt_neox, llama, mistral, qwen2, qwen3)
}


def get_adapter(model_or_config: PreTrainedModel | PreTrainedConfig | str) -> ArchitectureAdapter:
    """The adapter for a base model, its config or its `model_type`; a clear error for anything else."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"Unsupported base architecture {model_type!r}: lorsa_hf supports {', '.join(sorted(ADAPTERS))}. "
            "Adding one is a new module in lorsa_hf/adapters/."
        )
    return ADAPTERS[model_type]


__all__ = ["ADAPTERS", "ArchitectureAdapter", "AttentionWeights", "BaseAttention", "get_adapter"]
