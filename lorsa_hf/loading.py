"""`load_spliced`: a base model and a Lorsa, each from a folder, the Hub or memory, returned spliced together.

Above both the model and splicing in the layering (it loads a `LorsaForReplacement` and calls its `splice`).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from .modeling_lorsa import LorsaForReplacement

_SHARED_HUB_KWARGS = ("cache_dir", "token", "local_files_only")


def load_spliced(
    base: str | os.PathLike | PreTrainedModel,
    lorsa: str | os.PathLike | LorsaForReplacement,
    layers: list[int] | None = None,
    *,
    lorsa_subfolder: str = "",
    lorsa_revision: str | None = None,
    model_class: type = AutoModelForCausalLM,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a base model and a Lorsa (each a local folder, a Hub repo id, or an already loaded model) and return
    the base model with the Lorsa spliced into `layers` (default: all the Lorsa's layers).

    `from_pretrained_kwargs` (`revision`, `subfolder`, `dtype`, `device_map`, `attn_implementation`, ...) go to
    the base model's `from_pretrained`; `lorsa_subfolder` and `lorsa_revision` locate the Lorsa; `cache_dir`,
    `token` and `local_files_only` apply to both. The Lorsa is moved to the base model's device and dtype.
    """
    if not isinstance(base, PreTrainedModel):
        base = model_class.from_pretrained(base, **from_pretrained_kwargs)
    if not isinstance(lorsa, LorsaForReplacement):
        hub_kwargs = {key: from_pretrained_kwargs[key] for key in _SHARED_HUB_KWARGS if key in from_pretrained_kwargs}
        lorsa = LorsaForReplacement.from_pretrained(
            lorsa, subfolder=lorsa_subfolder, revision=lorsa_revision, **hub_kwargs
        )
    return lorsa.splice(base, layers=layers, move=True)


__all__ = ["load_spliced"]
