"""What conversion needs from the base model: its config and the gain (and bias) of the norm in front of each
replaced attention block, read from a loaded model or straight from its safetensors files (no model is built,
so converting a Lorsa for an 8B model does not load the 8B model)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel

from ..adapters import ArchitectureAdapter, get_adapter
from .foreign import CheckpointError
from .hub import fetch_file

BaseModelLike = PreTrainedModel | str | os.PathLike


@dataclass
class BaseModelInfo:
    """The base model's config, its name, and per replaced layer the input norm's gain and bias (None for an
    RMSNorm), in float64 on the CPU."""

    config: PreTrainedConfig
    name: str | None
    revision: str | None
    norms: dict[int, tuple[torch.Tensor, torch.Tensor | None]]

    @property
    def adapter(self) -> ArchitectureAdapter:
        return get_adapter(self.config)


def _check_layers(config: PreTrainedConfig, layers: list[int], name: str | None) -> None:
    for layer in layers:
        if not 0 <= layer < config.num_hidden_layers:
            raise CheckpointError(
                f"The Lorsa replaces layer {layer} but the base model {name or ''} has {config.num_hidden_layers} "
                f"layers (0..{config.num_hidden_layers - 1}); is this the base model it was trained on?"
            )


def _from_model(model: PreTrainedModel, layers: list[int]) -> BaseModelInfo:
    adapter = get_adapter(model)
    name = getattr(model.config, "_name_or_path", None) or None
    _check_layers(model.config, layers, name)
    norms = {}
    for layer in layers:
        norm = adapter.get_input_norm(model, layer)
        weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
        if weight is None:
            raise CheckpointError(f"Layer {layer}'s input norm {type(norm).__name__} has no gain (weight) to fold.")
        if adapter.input_norm_has_bias and bias is None:
            raise CheckpointError(
                f"Layer {layer}'s input norm has no bias, but a {adapter.model_type} LayerNorm has one."
            )
        norms[layer] = (
            weight.detach().to("cpu", torch.float64),
            None if bias is None else bias.detach().to("cpu", torch.float64),
        )
    return BaseModelInfo(model.config, name, getattr(model.config, "_commit_hash", None), norms)


def _weight_files(base: str, revision: str | None, cache_dir: str | None, token: str | bool | None) -> dict[str, Path]:
    """Map every tensor name of the base checkpoint to the safetensors file holding it."""
    index = fetch_file(base, "model.safetensors.index.json", revision=revision, cache_dir=cache_dir, token=token)
    if index is not None:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {
            file: fetch_file(base, file, revision=revision, cache_dir=cache_dir, token=token, required=True)
            for file in sorted(set(weight_map.values()))
        }
        return {key: files[file] for key, file in weight_map.items()}
    single = fetch_file(base, "model.safetensors", revision=revision, cache_dir=cache_dir, token=token)
    if single is None:
        raise CheckpointError(
            f"Base model {base!r} has no model.safetensors (or sharded index); pass the loaded model "
            "(base_model=AutoModelForCausalLM.from_pretrained(...)) instead."
        )
    try:
        with safe_open(str(single), framework="pt") as weights:
            return {key: single for key in weights.keys()}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(
            f"Cannot read the base model's {single} ({error}); it is corrupt or truncated."
        ) from error


def _norm_tensor(files: dict[str, Path], suffix: str) -> torch.Tensor | None:
    """The tensor whose name ends in `suffix` (e.g. `layers.1.input_layernorm.weight`), whatever the prefix."""
    matches = [key for key in files if key == suffix or key.endswith("." + suffix)]
    if len(matches) > 1:
        raise CheckpointError(f"The base model's weights hold several tensors named like {suffix!r}: {matches}.")
    if not matches:
        return None
    with safe_open(str(files[matches[0]]), framework="pt") as weights:
        return weights.get_tensor(matches[0]).to(torch.float64)


def _from_name(
    base: str, layers: list[int], revision: str | None, cache_dir: str | None, token: str | bool | None
) -> BaseModelInfo:
    try:
        config = AutoConfig.from_pretrained(base, revision=revision, cache_dir=cache_dir, token=token)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Cannot load the base model config from {base!r}: {error}") from error
    adapter = get_adapter(config)
    _check_layers(config, layers, base)
    files = _weight_files(base, revision, cache_dir, token)
    norms = {}
    for layer in layers:
        prefix = f"layers.{layer}.{adapter.input_norm_attribute}"
        weight = _norm_tensor(files, prefix + ".weight")
        bias = _norm_tensor(files, prefix + ".bias")
        if weight is None or (adapter.input_norm_has_bias and bias is None):
            raise CheckpointError(
                f"The base model's weights lack {prefix}.{'weight' if weight is None else 'bias'} "
                f"(the norm in front of layer {layer}'s attention); is {base!r} a complete {config.model_type} "
                "checkpoint?"
            )
        norms[layer] = (weight, bias)
    return BaseModelInfo(config, str(base), revision, norms)


def load_base_model_info(
    base_model: BaseModelLike,
    layers: list[int],
    revision: str | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
) -> BaseModelInfo:
    """Config and input-norm parameters of `base_model` (a loaded model, a local folder or a Hub repo id)."""
    if isinstance(base_model, PreTrainedModel):
        return _from_model(base_model, layers)
    if isinstance(base_model, (str, os.PathLike)):
        return _from_name(os.fspath(base_model), layers, revision, cache_dir, token)
    raise TypeError(
        f"base_model must be a loaded transformers model, a folder or a Hub repo id, got {type(base_model).__name__}."
    )
