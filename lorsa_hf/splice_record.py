"""The record of a splice in the base model's config, saving a spliced model without losing anything, and the
transformers entry points a spliced model refuses (continuous batching).

`base.save_pretrained(dir)` on a spliced model writes the base model's own weights (the attention modules the
Lorsa stands in for included), so `dir` loads as the clean base model, and each spliced Lorsa beside them in a
subfolder (`lorsa/`, or `lorsa-0/`, `lorsa-1/`, ... for several), named in `config.lorsa_splice`, from which
`load_spliced(dir)` brings the spliced model back. HF `Trainer` checkpoints go through the same method.
"""

from __future__ import annotations

import os
import types
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from .cache_support import refuse_continuous_batching
from .io import WEIGHT_FILE_PATTERNS, atomic_save_directory

RECORD_ATTRIBUTE = "lorsa_splice"
SUBFOLDER_PATTERNS = ("lorsa", "lorsa-*")


def _spliced_modules(model: PreTrainedModel) -> dict[str, nn.Module]:
    """The spliced attention modules of `model` by their state-dict prefix."""
    return {
        name: module for name, module in model.named_modules() if getattr(module, "is_lorsa_splice", False) is True
    }


def _groups(model: PreTrainedModel) -> list[tuple[Any, list[int]]]:
    """(Lorsa, the layers it replaces) for each Lorsa spliced into `model`, in order of first layer."""
    groups: dict[int, tuple[Any, list[int]]] = {}
    for module in _spliced_modules(model).values():
        owner = module.lorsa_model
        groups.setdefault(id(owner), (owner, []))[1].append(module.layer_idx)
    return sorted(((owner, sorted(layers)) for owner, layers in groups.values()), key=lambda group: group[1][0])


def update_record(model: PreTrainedModel) -> None:
    """Write `model.config.lorsa_splice` (what is spliced where, and where a save puts each Lorsa), route
    `model.save_pretrained` through `save_spliced_pretrained` and refuse continuous batching by name
    (`cache_support.refuse_continuous_batching`); remove all three once nothing is spliced."""
    groups = _groups(model)
    if not groups:
        if hasattr(model.config, RECORD_ATTRIBUTE):
            delattr(model.config, RECORD_ATTRIBUTE)
        model.__dict__.pop("save_pretrained", None)
        model.__dict__.pop("init_continuous_batching", None)
        return
    record = []
    for index, (owner, layers) in enumerate(groups):
        config = owner.config
        record.append(
            {
                "subfolder": "lorsa" if len(groups) == 1 else f"lorsa-{index}",
                "layers": layers,
                "n_ov_heads": config.n_ov_heads,
                "top_k": config.top_k,
                "activation": config.activation,
            }
        )
    setattr(model.config, RECORD_ATTRIBUTE, record)
    model.__dict__["save_pretrained"] = types.MethodType(save_spliced_pretrained, model)
    model.__dict__["init_continuous_batching"] = refuse_continuous_batching


def base_state_dict(model: PreTrainedModel, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` of the spliced `model` as the base model's own: each spliced slot's Lorsa tensors are replaced
    by the weights of the attention module it stands in for, in the dtype the Lorsa has now."""
    clean = dict(state_dict)
    for prefix, module in _spliced_modules(model).items():
        for key in [key for key in clean if key.startswith(f"{prefix}.lorsa.")]:
            del clean[key]
        reference = module.lorsa.W_Q
        for name, tensor in module.original_module.state_dict().items():
            dtype = reference.dtype if tensor.is_floating_point() else tensor.dtype
            clean[f"{prefix}.{name}"] = tensor.detach().to(device=reference.device, dtype=dtype)
    return clean


def save_spliced_pretrained(
    model: PreTrainedModel,
    save_directory: str | os.PathLike,
    *args: Any,
    state_dict: dict[str, torch.Tensor] | None = None,
    is_main_process: bool = True,
    push_to_hub: bool = False,
    **kwargs: Any,
) -> None:
    """`save_pretrained` of a spliced model (installed on it by `splice`): the clean base model plus each Lorsa
    in the subfolder its record names, written atomically (a save into the model's own folder is safe)."""
    if push_to_hub:
        repo_id = kwargs.pop("repo_id", None) or os.path.basename(os.path.realpath(save_directory))
        names = ("commit_message", "private", "token", "revision")
        hub_kwargs = {key: kwargs.pop(key) for key in names if key in kwargs}
        save_spliced_pretrained(model, save_directory, *args, state_dict=state_dict, **kwargs)
        model.push_to_hub(repo_id, **hub_kwargs)
        return
    clean = base_state_dict(model, model.state_dict() if state_dict is None else state_dict)
    if not is_main_process:
        type(model).save_pretrained(model, save_directory, *args, state_dict=clean, is_main_process=False, **kwargs)
        return
    with atomic_save_directory(save_directory, owned=WEIGHT_FILE_PATTERNS + SUBFOLDER_PATTERNS) as staging:
        type(model).save_pretrained(model, staging, *args, state_dict=clean, **kwargs)
        for (owner, _), entry in zip(_groups(model), getattr(model.config, RECORD_ATTRIBUTE), strict=True):
            owner.save_pretrained(os.path.join(staging, entry["subfolder"]))


__all__ = ["RECORD_ATTRIBUTE", "base_state_dict", "save_spliced_pretrained", "update_record"]
