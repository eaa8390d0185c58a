"""Which Lorsa format a folder holds, and which of its checkpoint folders replaces which base-model layer.

Imports nothing of the model, so `LorsaForReplacement.from_pretrained` can ask whether a folder is foreign.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..configuration_lorsa import LorsaConfig
from .foreign import CheckpointError, read_json_config
from .hub import fetch_folder, split_source
from .llamascopium import is_llamascopium_config, layer_from_hooks
from .paper_era import is_paper_era_config

FOREIGN_FORMATS = ("llamascopium", "paper_era")
CONFIG_PATTERNS = ["config.json", "*/config.json"]
"""The files that tell the format of a folder holding one checkpoint, or one checkpoint subfolder per layer."""


def checkpoint_format(config: dict[str, Any]) -> str | None:
    """`"lorsa_hf"`, `"llamascopium"` or `"paper_era"` for a checkpoint's config.json content, else None."""
    if config.get("model_type") == LorsaConfig.model_type:
        return "lorsa_hf"
    if is_llamascopium_config(config):
        return "llamascopium"
    if is_paper_era_config(config):
        return "paper_era"
    return None


def find_checkpoints(root: Path) -> dict[Path, str]:
    """The Lorsa checkpoint folders at `root` and their formats: `root` itself when it holds a config.json, else
    every immediate subfolder holding one in a format we know (one subfolder per layer)."""
    if (root / "config.json").is_file():
        return {root: checkpoint_format(read_json_config(root)) or "unknown"}
    found = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        kind = checkpoint_format(read_json_config(child))
        if kind is not None:
            found[child] = kind
    return found


def foreign_format(
    source: str | os.PathLike,
    subfolder: str = "",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> str | None:
    """`"llamascopium"` or `"paper_era"` when `source/subfolder` (a folder or Hub repo) holds a Lorsa in that
    format, or one such subfolder per layer; None for our own format and for anything unreadable (left for
    `from_pretrained` to report)."""
    source, subfolder = split_source(source, subfolder)
    try:
        root = fetch_folder(source, CONFIG_PATTERNS, subfolder, revision, cache_dir, token)
        kinds = set(find_checkpoints(root).values())
    except CheckpointError:
        return None
    foreign = sorted(kinds & set(FOREIGN_FORMATS))
    return foreign[0] if foreign else None


def _recorded_layer(folder: Path, kind: str) -> int | None:
    config = read_json_config(folder)
    if kind == "llamascopium":
        return layer_from_hooks(config, folder)
    layer = config.get("layer")
    return layer if isinstance(layer, int) and not isinstance(layer, bool) else None


def _check_convertible(found: dict[Path, str], root: Path) -> None:
    for folder, kind in found.items():
        if kind == "lorsa_hf":
            raise CheckpointError(
                f"{folder} already is a lorsa_hf checkpoint; load it with LorsaForReplacement.from_pretrained."
            )
        if kind not in FOREIGN_FORMATS:
            raise CheckpointError(
                f"{folder}/config.json is neither a llamascopium Lorsa (sae_type 'lorsa') nor a paper-era "
                "OpenMOSS/Lorsa config (n_ov_heads, d_ov_head); nothing to convert."
            )
    if not found:
        deeper = sorted({config.parent.parent.relative_to(root).as_posix() for config in root.glob("*/*/config.json")})
        hint = (
            f" It has layer folders one level further down, in {', '.join(deeper[:8])}: add one of those to the "
            "subfolder (the published layout is lorsa/{E}x/k{K}/layer{L}_lorsa_{E}x_k{K}/)."
            if deeper
            else ""
        )
        raise CheckpointError(
            f"{root} holds no Lorsa checkpoint: expected a config.json there, or layer folders (one subfolder per "
            f"layer with a config.json) in it.{hint}"
        )


def _select_single(folder: Path, kind: str, layers: list[int] | None) -> dict[int, tuple[Path, str]]:
    recorded = _recorded_layer(folder, kind)
    if recorded is None:
        if layers is None or len(layers) != 1:
            raise CheckpointError(
                f"{folder}/config.json records no layer; say which base-model layer it replaces "
                "(layers=[L], --layer L)."
            )
        return {layers[0]: (folder, kind)}
    if layers is not None and layers != [recorded]:
        raise CheckpointError(
            f"{folder} was trained for layer {recorded}, not {layers}; a Lorsa only reproduces the layer it was "
            "trained on."
        )
    return {recorded: (folder, kind)}


def select_checkpoints(
    found: dict[Path, str], root: Path, layers: list[int] | None
) -> dict[int, tuple[Path, str]]:
    """Base-model layer -> (folder, format) for the `layers` to convert (default: all) among the checkpoints
    `found` at `root`; refuses our own format, unknown formats, and layers that are missing or claimed twice."""
    _check_convertible(found, root)
    if len(found) == 1:
        ((folder, kind),) = found.items()
        return _select_single(folder, kind, layers)
    by_layer: dict[int, tuple[Path, str]] = {}
    for folder, kind in found.items():
        recorded = _recorded_layer(folder, kind)
        if recorded is None:
            raise CheckpointError(f"{folder}/config.json records no layer, so its place among the layers is unknown.")
        if recorded in by_layer:
            raise CheckpointError(f"{by_layer[recorded][0]} and {folder} both replace layer {recorded}.")
        by_layer[recorded] = (folder, kind)
    if layers is None:
        return dict(sorted(by_layer.items()))
    absent = [layer for layer in layers if layer not in by_layer]
    if absent:
        raise CheckpointError(f"{root} has no Lorsa for layer(s) {absent}; it holds layers {sorted(by_layer)}.")
    return {layer: by_layer[layer] for layer in layers}
