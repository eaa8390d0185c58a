"""Checks `LorsaForReplacement.from_pretrained` runs so that a bad folder is refused by name instead of loading
with random weights where its tensors are missing, renamed, NaN or of an integer type."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

FLOATING_DTYPES = ("F16", "BF16", "F32", "F64")


class LorsaLoadError(ValueError):
    """A Lorsa folder that cannot be loaded as it is; the message names the problem and the fix."""


def local_folder(source: str | os.PathLike | None, subfolder: str) -> Path | None:
    """The local folder `from_pretrained` reads, or None for a Hub repo id."""
    if source is None or not os.path.isdir(source):
        return None
    return Path(source, subfolder) if subfolder else Path(source)


def check_folder(folder: Path, config_given: bool) -> None:
    """Before loading a local folder: it has a Lorsa's config.json, and every tensor in it is floating point."""
    config_path = folder / "config.json"
    if not config_given and not config_path.is_file():
        raise LorsaLoadError(
            f"{folder} has no config.json: without it the Lorsa's shape is unknown. Save the Lorsa with "
            "save_pretrained (which writes config.json beside the weights), or pass config=LorsaConfig(...)."
        )
    if not config_given:
        model_type = json.loads(config_path.read_text()).get("model_type")
        if model_type != "lorsa":
            raise LorsaLoadError(
                f"{folder} holds a {model_type!r} model, not a Lorsa (its config.json has model_type "
                f"{model_type!r}). Pass it as the base model instead: load_spliced(base, lorsa)."
            )
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                dtype = handle.get_slice(name).get_dtype()
                if dtype not in FLOATING_DTYPES:
                    raise LorsaLoadError(
                        f"{path}: tensor {name} is {dtype}, but every Lorsa weight is floating point "
                        "(it would be cast, silently changing its values). Save the Lorsa again from a model."
                    )


def check_loading_info(source: Any, info: dict[str, Any]) -> None:
    """After loading: no weight of the model was missing from the checkpoint, none of the checkpoint unused."""
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(entry[0]) for entry in info.get("mismatched_keys", ()))
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing (they would be random): {', '.join(missing)}")
    if unexpected:
        parts.append(f"not part of this Lorsa: {', '.join(unexpected)}")
    if mismatched:
        parts.append(f"of the wrong shape: {', '.join(mismatched)}")
    raise LorsaLoadError(
        f"{source} does not match its config.json ({'; '.join(parts)}). Check that `layers`, `use_qk_norm` and "
        "the sizes in config.json are the ones the weights were saved with, and that no tensor was renamed."
    )


def check_finite(source: Any, model: nn.Module) -> None:
    """Every loaded weight is finite."""
    for name, parameter in model.named_parameters():
        if parameter.is_floating_point() and not bool(torch.isfinite(parameter).all()):
            raise LorsaLoadError(f"{source}: weight {name} holds NaN or infinite values; this Lorsa cannot be used.")


__all__ = ["LorsaLoadError", "check_finite", "check_folder", "check_loading_info", "local_folder"]
