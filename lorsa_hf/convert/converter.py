"""`convert_checkpoint`: foreign Lorsa folder(s) -> `LorsaForReplacement` (and optionally our format on disk).

The one module of `convert/` that imports the model; nothing else in `convert/` imports it, and the package's
`__init__` does not import this module, so the model may use the rest of `convert/` (format detection, the
conversion itself) without an import circle.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from ..io import atomic_save_directory
from ..modeling_lorsa import LorsaForReplacement
from .base_model import BaseModelLike
from .conversion import convert_weights
from .report import REPORT_FILE, ConversionReport


class Conversion(NamedTuple):
    """The converted Lorsa and the report of what was folded into it."""

    lorsa: LorsaForReplacement
    report: ConversionReport


def convert_checkpoint(
    source: str | os.PathLike,
    base_model: BaseModelLike,
    output_dir: str | os.PathLike | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    subfolder: str = "",
    revision: str | None = None,
    base_revision: str | None = None,
    weights_already_folded: bool = False,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Conversion:
    """Convert a Lorsa published by llamascopium (lm-saes) or by the paper-era OpenMOSS/Lorsa code.

    The format is detected from config.json. The base model's input-norm gain and bias and the dataset-wise
    normalisation factors are folded into the weights, so that, spliced into the Hugging Face model, the Lorsa
    computes exactly what the original implementation computed (see `lorsa_hf.convert.folding`).

    Args:
        source: A checkpoint folder, or a folder / Hub repo holding one checkpoint subfolder per layer; local path
            or Hub repo id (with `subfolder` and `revision`; llamascopium's `repo_id:subfolder` also works).
        base_model: The base model (loaded, or a folder / Hub repo id whose config and safetensors are read).
        output_dir: When given, the converted Lorsa and `conversion_report.json` are written there atomically.
        layers: Base-model layer(s) to convert from a multi-layer source (default: all), or the layer of a
            single checkpoint that does not record it.
        weights_already_folded: The stored weights already include the dataset-wise normalisation, whatever the
            config says. Needed for the folder a finished llamascopium training run writes: its config.json still
            says "dataset-wise" but the weights were folded at the end; nothing in the files tells the two apart.
        dtype: dtype of the converted weights (folding itself runs in float64).

    Returns:
        `Conversion(lorsa, report)`.
    """
    converted = convert_weights(
        source,
        base_model,
        layers=layers,
        subfolder=subfolder,
        revision=revision,
        base_revision=base_revision,
        weights_already_folded=weights_already_folded,
        dtype=dtype,
        cache_dir=cache_dir,
        token=token,
    )
    model = LorsaForReplacement.from_converted(converted)
    if output_dir is not None:
        with atomic_save_directory(output_dir) as staging:
            model.save_pretrained(staging)
            Path(staging, REPORT_FILE).write_text(converted.report.to_json())
    return Conversion(model, converted.report)


__all__ = ["Conversion", "convert_checkpoint"]
