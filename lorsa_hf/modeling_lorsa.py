"""The Lorsa layer (docs/method.md §1) and the `LorsaForReplacement` model that holds one per replaced layer."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init

from . import publishing
from .configuration_lorsa import LorsaConfig
from .convert.conversion import ConvertedLorsa, convert_if_foreign
from .io import atomic_save_directory
from .load_checks import check_finite, check_folder, check_loading_info, local_folder
from .splicing import splice, unsplice

if TYPE_CHECKING:
    from transformers import PreTrainedModel as BaseModel


from .layer import LorsaLayer, LorsaLayerOutput


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
                for name in (*publishing.SIDECAR_FILES, *publishing.OPTIONAL_FILES):
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
