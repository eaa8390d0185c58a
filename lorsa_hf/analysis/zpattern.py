"""z-patterns: how much each earlier token contributes to a head's activation, from the layer's own forward code.

z_i[s] = sum_t A_h(i)[s, t] v_i[t], with A_h(i) the attention pattern of head i's QK group and v_i its values;
`LorsaLayer.attention_pattern` returns both from the code the forward runs, so the contributions sum to z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..modeling_lorsa import LorsaLayer


@dataclass
class ZPattern:
    """pattern [B, n_qk, T, S] (each QK group's attention) and values [B, n_qk, S, g] (head i = group * g + j)."""

    pattern: torch.Tensor
    values: torch.Tensor

    @property
    def group_size(self) -> int:
        return self.values.shape[-1]

    def contributions(self, head: int, batch: int = 0) -> torch.Tensor:
        """[T, S]: the contribution of key t to head `head`'s z at query s; each row sums to z[s]."""
        group, j = divmod(head, self.group_size)
        return self.pattern[batch, group] * self.values[batch, group, :, j][None, :]

    def at(self, head: int, position: int, batch: int = 0) -> torch.Tensor:
        """[S]: the contribution of every key to head `head`'s z at `position` (zero after it)."""
        group, j = divmod(head, self.group_size)
        return self.pattern[batch, group, position] * self.values[batch, group, :, j]


def z_pattern(module: LorsaLayer, hidden_states: torch.Tensor, **arguments: Any) -> ZPattern:
    """The z-pattern of every head of `module` on its input [B, T, d], called with the arguments its forward
    gets (position embeddings or ids, attention mask)."""
    with torch.no_grad():
        pattern, values = module.attention_pattern(hidden_states, **arguments)
    return ZPattern(pattern, values)


def sparse_contributions(contributions: torch.Tensor, fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys [n] whose contribution [S] is at least `fraction` of the largest one in absolute value, with
    their contributions [n] (the sparse form the official post-analysis stores)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}.")
    magnitude = contributions.abs()
    keep = (magnitude >= fraction * magnitude.max()) & (magnitude > 0)
    keys = keep.nonzero().flatten()
    return keys, contributions[keys]


__all__ = ["ZPattern", "sparse_contributions", "z_pattern"]
