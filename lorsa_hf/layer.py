"""The Lorsa layer (docs/method.md §1): one replaced attention block, its forward read top to bottom."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from .cache_support import check_cache, update_cache
from .configuration_lorsa import LorsaConfig
from .ops.cached_inputs import input_form_attention, inputs_for_cache
from .ops.masks import boolean_attention_mask, mask_over_buffer
from .ops.paths import PATHS, LorsaPath
from .ops.projection import project_values
from .ops.rotary import apply_rotary
from .ops.selection import decoder_norms, select_from_groups
from .rotary_embedding import LorsaRotaryEmbedding


@dataclass
class LorsaLayerOutput(ModelOutput):
    """Output of one Lorsa layer.

    Args:
        hidden_states: `ŷ` [B, T, d], the prediction of the attention block's output.
        z: Every head's activation before selection [B, T, n_ov] (only when activations were requested).
        top_k_values: The kept activations `a` [B, T, K] (signed `z` for `topk_abs`, `relu(z)` for `topk_relu`).
        top_k_indices: The heads they belong to [B, T, K].
    """

    hidden_states: torch.Tensor | None = None
    z: torch.Tensor | None = None
    top_k_values: torch.Tensor | None = None
    top_k_indices: torch.Tensor | None = None

    def activations(self) -> torch.Tensor:
        """The sparse activations `a` as a dense [B, T, n_ov] tensor (zero where a head was not selected)."""
        if self.z is None or self.top_k_values is None or self.top_k_indices is None:
            raise ValueError("Activations were not requested: call the layer with output_activations=True.")
        return torch.zeros_like(self.z).scatter(-1, self.top_k_indices, self.top_k_values)


class LorsaLayer(nn.Module):
    """One Lorsa layer: `n_qk` QK groups of `g` one-dimensional OV heads, TopK-sparse per token.

    Parameters (public format): W_Q, W_K [n_qk, d, d_qk]; b_Q, b_K [n_qk, d_qk]; W_V, W_O [n_ov, d];
    b_V [n_ov]; b_O [d]; with `use_qk_norm` also q_norm_weight, k_norm_weight [n_qk, d_qk].
    """

    def __init__(self, config: LorsaConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        d, n_qk, d_qk, n_ov = config.hidden_size, config.n_qk_heads, config.d_qk_head, config.n_ov_heads
        self.W_Q = nn.Parameter(torch.empty(n_qk, d, d_qk))
        self.b_Q = nn.Parameter(torch.empty(n_qk, d_qk))
        self.W_K = nn.Parameter(torch.empty(n_qk, d, d_qk))
        self.b_K = nn.Parameter(torch.empty(n_qk, d_qk))
        self.W_V = nn.Parameter(torch.empty(n_ov, d))
        self.b_V = nn.Parameter(torch.empty(n_ov))
        self.W_O = nn.Parameter(torch.empty(n_ov, d))
        self.b_O = nn.Parameter(torch.empty(d))
        if config.use_qk_norm:
            self.q_norm_weight = nn.Parameter(torch.empty(n_qk, d_qk))
            self.k_norm_weight = nn.Parameter(torch.empty(n_qk, d_qk))
        self.rotary_emb = LorsaRotaryEmbedding(
            config.rotary_dim, config.rope_parameters, config.max_position_embeddings
        )

    def _qk_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMS norm over d_qk of each QK group, x [B, n_qk, T, d_qk], weight [n_qk, d_qk]."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))  # at least float32, float64 stays float64
        normed = (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.config.qk_norm_eps)).to(x.dtype)
        return normed * weight[None, :, None, :]

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        cache: Cache | None = None,
        output_activations: bool = False,
        top_k: int | None = None,
        sliding_window: int | None = None,
    ) -> LorsaLayerOutput:
        """Predict the attention block's output from its input `hidden_states` [B, T, d].

        Args:
            position_embeddings: The base model's `(cos, sin)` [B, T, rotary_dim]; when None the layer
                computes its own from `position_ids` (default: positions after what `cache` holds).
            attention_mask: Any mask transformers gives an attention module (None means causal).
            cache: A transformers `Cache` (dynamic or static layers, `lorsa_hf.cache_support`); keys
                [B, n_qk, T, d_qk] are written at index `layer_idx`, and as its values either the head values
                [B, n_qk, T, g] or, with `config.cached_inputs`, the input itself (laid out by
                `lorsa_hf.ops.cached_inputs.inputs_for_cache`: [B, n_qk, T, d / n_qk]).
            output_activations: Also return `z` and the selected activations.
            top_k: Heads kept per token for this call (K annealing in training); defaults to `config.top_k`.
            sliding_window: The window `attention_mask` carries (a sliding-window base layer's, e.g. Mistral's):
                a cache layer that drops the keys older than exactly this window is then accepted, and the mask
                over a static layer's buffer keeps to it.
        """
        config = self.config
        top_k = config.top_k if top_k is None else top_k
        if not isinstance(top_k, int) or isinstance(top_k, bool):
            raise TypeError(f"top_k must be an integer number of heads, got {top_k!r} ({type(top_k).__name__}).")
        if not 0 < top_k <= config.n_ov_heads:
            raise ValueError(f"top_k must be between 1 and n_ov_heads ({config.n_ov_heads}), got {top_k}.")
        if cache is not None:
            check_cache(cache, self.layer_idx, sliding_window)
        batch_size, seq_len, _ = hidden_states.shape
        if batch_size == 0 or seq_len == 0:
            return self._empty_output(hidden_states, top_k, output_activations)
        past_length = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        # The dense reference path (the reference implementations' formulation) or the fast path; under
        # torch.compile the dense one, which the compiler traces and fuses (the fast path's blocks depend on data)
        path = PATHS["dense" if torch.compiler.is_compiling() else config.implementation]

        query, key = self._queries_keys(path, hidden_states, position_embeddings, position_ids, past_length)

        # z [N, n_ov] (head i = group * g + j), the kept activations a and their heads [N, K]
        z, top_k_values, top_k_indices = self._attend_and_select(
            path, query, key, hidden_states, attention_mask, cache, top_k, sliding_window
        )

        # The decode: the K selected rows of W_O per token (sparse, with its own backward), or the dense reference
        # formulation over all n_ov heads
        output = path.decode(top_k_values, top_k_indices, self.W_O)
        output = (output + self.b_O).view(batch_size, seq_len, -1)
        if not output_activations:
            return LorsaLayerOutput(hidden_states=output)
        return LorsaLayerOutput(
            hidden_states=output,
            z=z.view(batch_size, seq_len, -1),
            top_k_values=top_k_values.view(batch_size, seq_len, top_k),
            top_k_indices=top_k_indices.view(batch_size, seq_len, top_k),
        )

    def _empty_output(self, hidden_states: torch.Tensor, top_k: int, output_activations: bool) -> LorsaLayerOutput:
        """The output for no tokens (a batch of 0 sequences, or sequences of length 0): empty tensors."""
        batch_size, seq_len, d = hidden_states.shape
        output = hidden_states.new_zeros(batch_size, seq_len, d)
        if not output_activations:
            return LorsaLayerOutput(hidden_states=output)
        return LorsaLayerOutput(
            hidden_states=output,
            z=hidden_states.new_zeros(batch_size, seq_len, self.config.n_ov_heads),
            top_k_values=hidden_states.new_zeros(batch_size, seq_len, top_k),
            top_k_indices=torch.zeros(batch_size, seq_len, top_k, dtype=torch.long, device=hidden_states.device),
        )

    def extra_repr(self) -> str:
        config = self.config
        return (
            f"layer_idx={self.layer_idx}, hidden_size={config.hidden_size}, n_ov_heads={config.n_ov_heads}, "
            f"n_qk_heads={config.n_qk_heads}, d_qk_head={config.d_qk_head}, top_k={config.top_k}, "
            f"activation={config.activation!r}"
        )

    def _queries_keys(
        self,
        path: LorsaPath,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
        position_ids: torch.Tensor | None,
        past_length: int | torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k [B, n_qk, T, d_qk], QK-normed and rotated (positions default to those after `past_length`, an
        int or a static cache's 0-dim counter)."""
        config = self.config
        query, key = path.project_queries_keys(hidden_states, self.W_Q, self.b_Q, self.W_K, self.b_K)
        if config.use_qk_norm:
            query, key = self._qk_norm(query, self.q_norm_weight), self._qk_norm(key, self.k_norm_weight)
        if config.rotary_dim > 0:
            if position_embeddings is None:
                if position_ids is None:
                    seq_len = hidden_states.shape[1]
                    position_ids = (torch.arange(seq_len, device=hidden_states.device) + past_length)[None]
                position_embeddings = self.rotary_emb(hidden_states, position_ids)
            cos, sin = position_embeddings
            query = apply_rotary(query, cos, sin, config.rotary_adjacent_pairs, one_node=path.rotary_one_node)
            key = apply_rotary(key, cos, sin, config.rotary_adjacent_pairs, one_node=path.rotary_one_node)
        return query, key

    def _attend_and_select(
        self,
        path: LorsaPath,
        query: torch.Tensor,
        key: torch.Tensor,
        hidden_states: torch.Tensor,
        attention_mask: Any,
        cache: Cache | None,
        top_k: int,
        sliding_window: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_i[s] = sum_t A_h(i)[s, t] v_i[t] (one attention per QK group with value width g) and the TopK selection
        weighted by the decoder norms, over the keys and values `cache` holds (`_update_cache`, which also gives the
        mask over them). The fast path runs both as one node whose gradient reaches z only at the kept entries,
        and projects v = x W_V^T + b_V where it is cheaper. A cache of values gets v; a cache of inputs gets x,
        and wherever it holds keys of other tokens than these (earlier ones, or a static layer's buffer) the
        attention runs over x and projects with W_V afterwards (the input form, docs/method.md §1b)."""
        config = self.config
        scale = 1.0 / config.attn_scale
        if cache is not None and not config.cached_inputs:
            value = project_values(hidden_states, self.W_V, self.b_V, config.n_qk_heads)  # [B, n_qk, T, g]
            key, value, attention_mask = self._update_cache(cache, key, value, attention_mask, sliding_window)
            return path.attention_top_k(query, key, value, attention_mask, scale, self.W_O, top_k, config.activation)
        if cache is not None:
            inputs = inputs_for_cache(hidden_states, config.n_qk_heads)
            key, inputs, attention_mask = self._update_cache(cache, key, inputs, attention_mask, sliding_window)
            if key.shape[-2] != hidden_states.shape[1]:
                z = input_form_attention(query, key, inputs, self.W_V, self.b_V, attention_mask, scale=scale)
                return select_from_groups(z, decoder_norms(self.W_O), top_k, config.activation)
        return path.projected_attention_top_k(
            query, key, hidden_states, self.W_V, self.b_V, attention_mask, scale, self.W_O, top_k, config.activation
        )

    def _update_cache(
        self, cache: Cache, key: torch.Tensor, value: torch.Tensor, attention_mask: Any, sliding_window: int | None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Every key and cache value this layer holds after writing the new ones (`update_cache`), and the mask
        over them: the given one, or over a static layer's buffer one that also hides the slots not yet written
        and keeps to `sliding_window`."""
        batch_size, _, query_length, _ = key.shape
        key, value, positions = update_cache(cache, self.layer_idx, key, value)
        if positions is not None:
            query_start, key_start = positions
            attention_mask = mask_over_buffer(
                attention_mask, batch_size, query_start, key_start, query_length, key.shape[-2], key.device,
                sliding_window,
            )
        return key, value, attention_mask

    @torch.no_grad()
    def attention_pattern(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        sliding_window: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each QK group's attention pattern A [B, n_qk, T, S] and the head values v [B, n_qk, S, g] behind
        `forward` (no cache) with the same arguments: z_i[s] = sum_t A_h(i)[s, t] v_i[t] (head i = group * g + j),
        so A[b, h(i), s, t] * v[b, h(i), t, j] is the contribution of token t to z_i[s] (what
        `lorsa_hf.analysis` reads as z-patterns).

        q and k come from the forward's own `_queries_keys`, v from the same projection; rows with no key to
        attend to (padding) are zero, as in the forward. `sliding_window` is taken as `forward` takes it; the
        window itself arrives inside `attention_mask`, as in the forward.
        """
        path = PATHS[self.config.implementation]
        query, key = self._queries_keys(path, hidden_states, position_embeddings, position_ids, past_length=0)
        batch_size, _, query_length, _ = query.shape
        mask = boolean_attention_mask(attention_mask, batch_size, query_length, key.shape[-2], query.device)
        logits = torch.matmul(query, key.transpose(-1, -2)) / self.config.attn_scale
        if mask is not None:
            logits = logits.masked_fill(~mask, -torch.inf)
        pattern = torch.softmax(logits, dim=-1).nan_to_num(0.0)
        values = project_values(hidden_states, self.W_V, self.b_V, self.config.n_qk_heads)
        return pattern, values.to(pattern.dtype)


__all__ = ["LorsaLayer", "LorsaLayerOutput"]
