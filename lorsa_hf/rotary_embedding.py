"""The rotary angles `(cos, sin)` of a Lorsa that does not use the base model's own.

The base model's own `(cos, sin)` are used when the Lorsa rotates the same dimensions with the same
frequencies; otherwise the Lorsa computes its own with transformers' rotary initialisers, so every rope
type transformers knows (default, linear, llama3, yarn, ...) gives the same frequencies as in the base model.
`lorsa_hf.ops.rotary` applies them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def _frequency_config(rotary_dim: int, rope_parameters: dict[str, Any], max_position_embeddings: int) -> LlamaConfig:
    """A config that transformers' rope initialisers read as 'one head of `rotary_dim` fully rotated dims'."""
    rope = {key: value for key, value in rope_parameters.items() if key != "partial_rotary_factor"}
    return LlamaConfig(
        hidden_size=rotary_dim,
        num_attention_heads=1,
        head_dim=rotary_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope,
    )


class LorsaRotaryEmbedding(nn.Module):
    """`(cos, sin)` of shape [B, T, rotary_dim] in rotate-half layout, as transformers' rotary modules return."""

    def __init__(self, rotary_dim: int, rope_parameters: dict[str, Any], max_position_embeddings: int) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.rope_parameters = dict(rope_parameters)
        self.max_position_embeddings = max_position_embeddings
        self._inv_freq: dict[torch.device, tuple[torch.Tensor, float]] = {}

    def _frequencies(self, device: torch.device) -> tuple[torch.Tensor, float]:
        if device not in self._inv_freq:
            config = _frequency_config(self.rotary_dim, self.rope_parameters, self.max_position_embeddings)
            rope_type = config.rope_parameters["rope_type"]
            if rope_type == "default":
                init = LlamaRotaryEmbedding.compute_default_rope_parameters
            elif rope_type in ROPE_INIT_FUNCTIONS:
                init = ROPE_INIT_FUNCTIONS[rope_type]
            else:
                raise ValueError(f"Unknown rope_type {rope_type!r}; transformers knows {sorted(ROPE_INIT_FUNCTIONS)}.")
            inv_freq, scaling = init(config, device=device)
            self._inv_freq[device] = (inv_freq.to(device), scaling)
        return self._inv_freq[device]

    @torch.no_grad()
    def forward(self, like: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions [B, T] -> (cos, sin) [B, T, rotary_dim] in the dtype of `like`, computed in float32 as
        transformers does, so the numbers equal the base model's for the same settings."""
        inv_freq, scaling = self._frequencies(like.device)
        freqs = position_ids[..., None].float() * inv_freq.to(like.device, torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scaling).to(like.dtype), (emb.sin() * scaling).to(like.dtype)
