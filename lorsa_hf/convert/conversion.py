"""Foreign Lorsa checkpoint(s) -> a `LorsaConfig`, the folded weights of each layer, and the report.

Imports nothing of the model: `LorsaForReplacement.from_converted` turns the result into a model, both for
`convert_checkpoint` and for `LorsaForReplacement.from_pretrained` on a foreign folder.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..configuration_lorsa import LorsaConfig
from .base_model import BaseModelInfo, BaseModelLike, load_base_model_info
from .detect import CONFIG_PATTERNS, find_checkpoints, foreign_format, select_checkpoints
from .folding import fold
from .foreign import CheckpointError, ForeignLorsa
from .hub import fetch_folder, is_local, split_source
from .llamascopium import LM_CONFIG_FILE, read_llamascopium
from .llamascopium import WEIGHTS_FILE as LLAMASCOPIUM_WEIGHTS
from .paper_era import WEIGHTS_FILE as PAPER_ERA_WEIGHTS
from .paper_era import read_paper_era
from .report import ConversionReport, layer_report


@dataclass
class ConvertedLorsa:
    """A converted foreign Lorsa before it is a model: its config, each layer's folded `LorsaLayer` state dict
    (base-model layer -> parameter name -> tensor, in `dtype`), and the report of what was folded in."""

    config: LorsaConfig
    layer_state_dicts: dict[int, dict[str, torch.Tensor]]
    dtype: torch.dtype
    report: ConversionReport


_SHARED = (
    "n_ov_heads",
    "n_qk_heads",
    "d_qk_head",
    "top_k",
    "activation",
    "attn_scale",
    "rotary_dim",
    "rotary_adjacent_pairs",
    "rope_parameters",
    "use_qk_norm",
    "qk_norm_eps",
)
"""Settings one `LorsaForReplacement` shares across its layers, so every converted layer must agree on them."""


def _read(folder: Path, kind: str, weights_already_folded: bool) -> ForeignLorsa:
    if kind == "llamascopium":
        return read_llamascopium(folder, weights_already_folded=weights_already_folded)
    return read_paper_era(folder, weights_already_folded=weights_already_folded)


# Model families a recorded base-model name names, by a piece of that name, and the model types they have.
_FAMILIES = {
    "pythia": ("gpt_neox",), "neox": ("gpt_neox",), "llama": ("llama",), "smollm": ("llama",),
    "qwen": ("qwen2", "qwen3"), "mistral": ("mistral",),
}


def _check_recorded_base(lorsa: ForeignLorsa, base: BaseModelInfo) -> None:
    """Refuse a base model whose architecture or name differs from what the foreign config records."""
    recorded = lorsa.model_name
    if not recorded:
        return
    given = base.name or f"a {base.config.model_type} model"
    for piece, model_types in _FAMILIES.items():
        if piece in recorded.lower() and base.config.model_type not in model_types:
            raise CheckpointError(
                f"{lorsa.path} was trained on {recorded!r} (a {'/'.join(model_types)} model, as its config records), "
                f"but the base model given is {given!r}, a {base.config.model_type} model. Pass the base model this "
                "Lorsa was trained on."
            )
    is_hub_id = base.name is not None and base.name.count("/") == 1 and not os.path.exists(base.name)
    if is_hub_id and "/" in recorded and base.name.lower() != recorded.lower():
        raise CheckpointError(
            f"{lorsa.path} was trained on {recorded!r} (as its config records), but the base model given is "
            f"{base.name!r}. Pass the base model this Lorsa was trained on."
        )


def _check_against_base(foreign: dict[int, ForeignLorsa], base: BaseModelInfo) -> None:
    first_layer, first = next(iter(foreign.items()))
    for layer, lorsa in foreign.items():
        _check_recorded_base(lorsa, base)
        if lorsa.d_model != base.config.hidden_size:
            raise CheckpointError(
                f"{lorsa.path} was trained for d_model {lorsa.d_model} but the base model {base.name or ''} has hidden "
                f"size {base.config.hidden_size}; pass the base model this Lorsa was trained on."
            )
        for name in _SHARED:
            if getattr(lorsa, name) != getattr(first, name):
                raise CheckpointError(
                    f"Layers {first_layer} and {layer} differ in {name} ({getattr(first, name)!r} vs "
                    f"{getattr(lorsa, name)!r}); one LorsaForReplacement shares these across its layers: convert "
                    "them separately (layers=[...])."
                )


def _describe_source(folder: Path, source: str | os.PathLike, root: Path, subfolder: str, revision: str | None) -> str:
    """The folder as the user named it: a local path, or `repo_id/subfolder@revision` for a Hub repo."""
    if is_local(source):
        return str(folder)
    inside = "/".join(
        part for part in (subfolder.strip("/"), folder.relative_to(root).as_posix()) if part not in ("", ".")
    )
    return f"{os.fspath(source)}{'/' + inside if inside else ''}@{revision or 'main'}"


def _read_selected(
    source: str | os.PathLike, subfolder: str, layers: list[int] | None, weights_already_folded: bool,
    hub: dict[str, Any],
) -> tuple[Path, dict[int, ForeignLorsa]]:
    """The checkpoint root and the foreign Lorsa of each selected layer (fetching only their files from the Hub)."""
    root = fetch_folder(source, CONFIG_PATTERNS, subfolder, **hub)
    selected = select_checkpoints(find_checkpoints(root), root, layers)
    if not is_local(source):
        prefixes = [
            "" if folder == root else f"{folder.relative_to(root).as_posix()}/" for folder, _ in selected.values()
        ]
        files = ("config.json", LM_CONFIG_FILE, LLAMASCOPIUM_WEIGHTS, PAPER_ERA_WEIGHTS)
        fetch_folder(source, [prefix + name for prefix in prefixes for name in files], subfolder, **hub)
    foreign = {}
    for layer, (folder, kind) in selected.items():
        lorsa = _read(folder, kind, weights_already_folded)
        lorsa.layer = layer
        foreign[layer] = lorsa
    return root, foreign


def convert_weights(
    source: str | os.PathLike,
    base_model: BaseModelLike,
    *,
    layers: int | Sequence[int] | None = None,
    subfolder: str = "",
    revision: str | None = None,
    base_revision: str | None = None,
    weights_already_folded: bool = False,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> ConvertedLorsa:
    """Read and fold a llamascopium or paper-era Lorsa against its base model; the arguments are those of
    `lorsa_hf.convert_checkpoint` (which makes the result a model and can write it)."""
    layer_list = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    source, subfolder = split_source(source, subfolder)
    hub = dict(revision=revision, cache_dir=cache_dir, token=token)
    root, foreign = _read_selected(source, subfolder, layer_list, weights_already_folded, hub)
    base = load_base_model_info(base_model, list(foreign), revision=base_revision, cache_dir=cache_dir, token=token)
    _check_against_base(foreign, base)

    first = next(iter(foreign.values()))
    config = LorsaConfig.from_base_config(
        base.config,
        list(foreign),
        base_model_name_or_path=base.name,
        base_model_revision=base.revision,
        **{name: getattr(first, name) for name in _SHARED},
    )
    state_dicts = {layer: fold(lorsa, *base.norms[layer], dtype=dtype) for layer, lorsa in foreign.items()}
    report = ConversionReport(
        base_model=base.name,
        base_model_type=base.config.model_type,
        layers=[
            layer_report(lorsa, base, _describe_source(lorsa.path, source, root, subfolder, revision))
            for lorsa in foreign.values()
        ],
    )
    return ConvertedLorsa(config, state_dicts, dtype, report)


def convert_if_foreign(
    source: str | os.PathLike | None,
    base_model: BaseModelLike | None,
    weights_already_folded: bool,
    from_pretrained_kwargs: dict[str, Any],
    layers: int | Sequence[int] | None = None,
) -> ConvertedLorsa | None:
    """What `LorsaForReplacement.from_pretrained` builds its model from when `source` is a foreign folder
    (its `layers`, default all, converted against `base_model`), or None when it is not one and the regular
    loader applies (which ignores `base_model` and `layers`)."""
    hub = {key: from_pretrained_kwargs.get(key) for key in ("revision", "cache_dir", "token")}
    subfolder = from_pretrained_kwargs.get("subfolder") or ""
    kind = None if source is None else foreign_format(source, subfolder, **hub)
    if kind is None:
        if weights_already_folded:
            raise ValueError(
                "weights_already_folded only applies to foreign (llamascopium, paper-era) checkpoints; "
                f"{source} is not one."
            )
        return None
    if base_model is None:
        raise ValueError(
            f"{source} holds a {kind} Lorsa checkpoint; converting it needs the base model it was trained on: "
            "pass base_model= (the loaded model, or its folder / Hub repo id)."
        )
    dtype = from_pretrained_kwargs.get("dtype")
    return convert_weights(
        source,
        base_model,
        layers=layers,
        subfolder=subfolder,
        weights_already_folded=weights_already_folded,
        dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
        **hub,
    )


__all__ = ["ConvertedLorsa", "convert_if_foreign", "convert_weights"]
