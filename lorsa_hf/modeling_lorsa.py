"""The Lorsa layer (docs/method.md §1) and the `LorsaForReplacement` model that holds one per replaced layer."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from . import publishing
from .cache_support import check_cache
from .configuration_lorsa import LorsaConfig
from .convert.conversion import ConvertedLorsa, convert_if_foreign
from .io import atomic_save_directory
from .load_checks import check_finite, check_folder, check_loading_info, local_folder
from .ops.cached_inputs import input_form_attention, inputs_for_cache
from .ops.masks import boolean_attention_mask
from .ops.paths import PATHS, LorsaPath
from .ops.projection import project_values
from .ops.rotary import apply_rotary
from .ops.selection import decoder_norms, select_from_groups
from .rotary_embedding import LorsaRotaryEmbedding
from .splicing import splice, unsplice

if TYPE_CHECKING:
    from transformers import PreTrainedModel as BaseModel


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
            cache: A transformers `Cache`; keys [B, n_qk, T, d_qk] are appended at index `layer_idx`, and as its
                values either the head values [B, n_qk, T, g] or, with `config.cached_inputs`, the input itself
                (laid out by `lorsa_hf.ops.cached_inputs.inputs_for_cache`: [B, n_qk, T, d / n_qk]).
            output_activations: Also return `z` and the selected activations.
            top_k: Heads kept per token for this call (K annealing in training); defaults to `config.top_k`.
            sliding_window: The window `attention_mask` carries (a sliding-window base layer's, e.g. Mistral's):
                a cache layer that drops the keys older than exactly this window is then accepted.
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
            path, query, key, hidden_states, attention_mask, cache, past_length, top_k
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
        past_length: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k [B, n_qk, T, d_qk], QK-normed and rotated (positions default to those after `past_length`)."""
        config = self.config
        query, key = path.project_queries_keys(hidden_states, self.W_Q, self.b_Q, self.W_K, self.b_K)
        if config.use_qk_norm:
            query, key = self._qk_norm(query, self.q_norm_weight), self._qk_norm(key, self.k_norm_weight)
        if config.rotary_dim > 0:
            if position_embeddings is None:
                if position_ids is None:
                    seq_len = hidden_states.shape[1]
                    position_ids = torch.arange(past_length, past_length + seq_len, device=hidden_states.device)[None]
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
        past_length: int,
        top_k: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z_i[s] = sum_t A_h(i)[s, t] v_i[t] (one attention per QK group with value width g) and the TopK selection
        weighted by the decoder norms, with the keys and values of `cache` prepended. The fast path runs both as
        one node whose gradient reaches z only at the kept entries, and projects v = x W_V^T + b_V where it is
        cheaper. A cache of values gets v; a cache of inputs gets x, and every step after the first attends
        over x and projects with W_V afterwards (the input form, docs/method.md §1b)."""
        config = self.config
        scale = 1.0 / config.attn_scale
        if cache is not None and not config.cached_inputs:
            value = project_values(hidden_states, self.W_V, self.b_V, config.n_qk_heads)  # [B, n_qk, T, g]
            key, value = cache.update(key, value, self.layer_idx)
            return path.attention_top_k(query, key, value, attention_mask, scale, self.W_O, top_k, config.activation)
        if cache is not None:
            key, inputs = cache.update(key, inputs_for_cache(hidden_states, config.n_qk_heads), self.layer_idx)
            if past_length > 0:
                z = input_form_attention(query, key, inputs, self.W_V, self.b_V, attention_mask, scale=scale)
                return select_from_groups(z, decoder_norms(self.W_O), top_k, config.activation)
        return path.projected_attention_top_k(
            query, key, hidden_states, self.W_V, self.b_V, attention_mask, scale, self.W_O, top_k, config.activation
        )

    @torch.no_grad()
    def attention_pattern(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each QK group's attention pattern A [B, n_qk, T, S] and the head values v [B, n_qk, S, g] behind
        `forward` (no cache) with the same arguments: z_i[s] = sum_t A_h(i)[s, t] v_i[t] (head i = group * g + j),
        so A[b, h(i), s, t] * v[b, h(i), t, j] is the contribution of token t to z_i[s] (what
        `lorsa_hf.analysis` reads as z-patterns).

        q and k come from the forward's own `_queries_keys`, v from the same projection; rows with no key to
        attend to (padding) are zero, as in the forward.
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


class LorsaPreTrainedModel(PreTrainedModel):
    config_class = LorsaConfig
    config: LorsaConfig
    base_model_prefix = "lorsa"
    main_input_name = "hidden_states"
    _no_split_modules = ["LorsaLayer"]
    _supports_sdpa = True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Random init: encoders N(0, 1/d), decoder rows of unit norm, biases zero."""
        if isinstance(module, LorsaLayer):
            std = 1.0 / math.sqrt(self.config.hidden_size)
            for weight in (module.W_Q, module.W_K, module.W_V, module.W_O):
                init.normal_(weight, mean=0.0, std=std)
            for bias in (module.b_Q, module.b_K, module.b_V, module.b_O):
                init.zeros_(bias)
            if self.config.use_qk_norm:
                init.ones_(module.q_norm_weight)
                init.ones_(module.k_norm_weight)


class LorsaForReplacement(LorsaPreTrainedModel):
    """A set of Lorsa layers trained to replace the attention blocks `config.layers` of one base model.

    Use it standalone on attention inputs (`forward`), or splice it into the base model so that the model's
    own forward and `generate()` run with the Lorsa in place of attention (`splice` / `unsplice`).
    """

    def __init__(self, config: LorsaConfig) -> None:
        super().__init__(config)
        self.layers = nn.ModuleDict({str(layer): LorsaLayer(config, layer) for layer in config.layers})
        self.post_init()

    def layer(self, index: int) -> LorsaLayer:
        """The Lorsa layer replacing base-model layer `index`."""
        if str(index) not in self.layers:
            raise KeyError(f"This Lorsa replaces layers {self.config.layers}, not layer {index}.")
        return self.layers[str(index)]

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer: int | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        output_activations: bool = True,
        top_k: int | None = None,
    ) -> LorsaLayerOutput:
        """Run the Lorsa of base-model layer `layer` (default: the only one) on its attention input [B, T, d].

        Positions default to 0..T-1 and the mask to plain causal attention.
        """
        if layer is None:
            if len(self.config.layers) != 1:
                raise ValueError(f"This Lorsa replaces layers {self.config.layers}: pass layer=... to choose one.")
            layer = self.config.layers[0]
        module = self.layer(layer)
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"hidden_states must be [batch, seq, {self.config.hidden_size}], got {tuple(hidden_states.shape)}."
            )
        if hidden_states.dtype != module.W_Q.dtype:
            raise TypeError(
                f"hidden_states are {hidden_states.dtype} but the Lorsa is {module.W_Q.dtype}: "
                "cast one of them (e.g. lorsa.to(dtype)) first."
            )
        return module(
            hidden_states,
            position_ids=position_ids,
            attention_mask=attention_mask,
            output_activations=output_activations,
            top_k=top_k,
        )

    def splice(self, model: BaseModel, layers: list[int] | None = None, move: bool = False) -> BaseModel:
        """Replace, in place, the attention modules of `layers` (default: all of `config.layers`) of `model`
        (a `*ForCausalLM` / `*Model` of a supported architecture, `lorsa_hf.adapters.ADAPTERS`) with these Lorsa
        layers, and return `model`.

        The Lorsa must be on the base model's device and dtype; `move=True` moves it there instead.
        """
        return splice(self, model, layers=layers, move=move)

    def unsplice(self, model: BaseModel) -> BaseModel:
        """Put back the attention modules that `splice` replaced; the model is then exactly as before."""
        return unsplice(model, self)

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None,
        *model_args: Any,
        base_model: Any = None,
        weights_already_folded: bool = False,
        layers: int | list[int] | None = None,
        **kwargs: Any,
    ) -> LorsaForReplacement:
        """`PreTrainedModel.from_pretrained`, plus: a folder or Hub repo holding a Lorsa published by llamascopium
        (lm-saes) or the paper-era OpenMOSS/Lorsa code, or one such subfolder per layer (the published layout
        `lorsa/{E}x/k{K}/layer{L}_lorsa_{E}x_k{K}/`, given as `subfolder="lorsa/8x/k64"`), is converted on the fly
        against `base_model`: its `layers` (default all; see `lorsa_hf.convert_checkpoint`, and
        `weights_already_folded` there). A lorsa_hf checkpoint loads whole, and must replace `layers` when given.

        A folder that would load with random or altered weights is refused with a `LorsaLoadError`: no
        config.json, a base model's folder, a tensor missing, renamed or of the wrong shape (a hand-edited
        `layers`, `use_qk_norm` without norm weights), integer or non-finite weights."""
        source = pretrained_model_name_or_path
        converted = convert_if_foreign(source, base_model, weights_already_folded, kwargs, layers=layers)
        if converted is not None:
            return cls.from_converted(converted)
        folder = local_folder(source, kwargs.get("subfolder") or "")
        if folder is not None:
            check_folder(folder, config_given=kwargs.get("config") is not None)
        output_loading_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(source, *model_args, output_loading_info=True, **kwargs)
        check_loading_info(source, info)
        check_finite(source, model)
        _check_replaces(source, model.config.layers, layers)
        return (model, info) if output_loading_info else model

    @classmethod
    def from_converted(cls, converted: ConvertedLorsa) -> LorsaForReplacement:
        """The model holding a converted foreign checkpoint (`lorsa_hf.convert.convert_weights`), in eval mode."""
        model = cls(converted.config).to(converted.dtype).eval()
        for layer, state_dict in converted.layer_state_dicts.items():
            model.layer(layer).load_state_dict(state_dict)
        return model

    def save_pretrained(self, save_directory: str | Any, *args: Any, push_to_hub: bool = False, **kwargs: Any) -> None:
        """`PreTrainedModel.save_pretrained` (config.json + model.safetensors), written atomically: a killed
        save never leaves a half-written checkpoint that loads. With `push_to_hub=True` the folder is then
        uploaded with the files beside the weights (`repo_id` defaults to the folder's name; `commit_message`,
        `private`, `token`, `revision`, `create_pr`, `subfolder` are passed to `push_to_hub`)."""
        hub_kwargs = {key: kwargs.pop(key) for key in _HUB_KWARGS if key in kwargs}
        with atomic_save_directory(save_directory) as staging:
            super().save_pretrained(staging, *args, **kwargs)
        if push_to_hub:
            repo_id = hub_kwargs.pop("repo_id", None) or os.path.basename(os.path.realpath(save_directory))
            self.push_to_hub(repo_id, files_from=save_directory, **hub_kwargs)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        commit_message: str | None = None,
        private: bool | None = None,
        token: bool | str | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        subfolder: str = "",
        files_from: str | os.PathLike | None = None,
    ) -> Any:
        """Upload this Lorsa (config.json, model.safetensors) and the files beside it (training_recipe.json,
        results.json, the README.md card) to the model repo `repo_id`, under `subfolder`, on branch `revision`.

        The files beside the weights come from `files_from`, by default the folder the Lorsa was loaded from;
        a card is uploaded only with the results.json its numbers come from (`lorsa_hf.publishing`). Returns
        the `CommitInfo`.
        """
        source = files_from if files_from is not None else self.name_or_path
        with tempfile.TemporaryDirectory() as staging:
            self.save_pretrained(staging)
            if source and os.path.isdir(source):
                for name in publishing.SIDECAR_FILES:
                    if os.path.isfile(os.path.join(source, name)):
                        shutil.copyfile(os.path.join(source, name), os.path.join(staging, name))
            files = publishing.check_sidecars(staging, require=())
            return publishing.upload_folder(
                staging, repo_id, files, private=private, revision=revision, commit_message=commit_message,
                subfolder=subfolder, token=token, create_pr=create_pr,
            )


def _check_replaces(source: Any, replaced: list[int], layers: int | list[int] | None) -> None:
    """A loaded lorsa_hf checkpoint must replace every layer asked for."""
    wanted = [] if layers is None else [layers] if isinstance(layers, int) else list(layers)
    missing = [layer for layer in wanted if layer not in replaced]
    if missing:
        raise ValueError(
            f"{source} replaces layers {replaced}, not {missing}; a Lorsa only reproduces the layers it was trained on."
        )


_HUB_KWARGS = ("repo_id", "commit_message", "private", "token", "revision", "create_pr", "subfolder")


__all__ = ["LorsaForReplacement", "LorsaLayer", "LorsaLayerOutput", "LorsaPreTrainedModel"]
