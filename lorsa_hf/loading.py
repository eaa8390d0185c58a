"""`load_spliced`: a base model and a Lorsa, each from a folder, the Hub or memory, returned spliced together.

Above both the model and splicing in the layering (it loads a `LorsaForReplacement` and calls its `splice`).
"""

from __future__ import annotations

import os
from typing import Any

from transformers import AutoModelForCausalLM, PreTrainedModel

from .modeling_lorsa import LorsaForReplacement
from .splice_record import RECORD_ATTRIBUTE

_SHARED_HUB_KWARGS = ("cache_dir", "token", "local_files_only")


def load_spliced(
    base: str | os.PathLike | PreTrainedModel,
    lorsa: str | os.PathLike | LorsaForReplacement | None = None,
    layers: list[int] | None = None,
    *,
    lorsa_subfolder: str = "",
    lorsa_revision: str | None = None,
    model_class: type = AutoModelForCausalLM,
    **from_pretrained_kwargs: Any,
) -> PreTrainedModel:
    """Load a base model and a Lorsa (each a local folder, a Hub repo id, or an already loaded model) and return
    the base model with the Lorsa spliced into `layers` (default: all the Lorsa's layers).

    With `lorsa` omitted, `base` is a folder (or repo) saved from a spliced model: each Lorsa its
    `config.lorsa_splice` records is loaded from its subfolder and spliced back into the layers it held.

    `from_pretrained_kwargs` (`revision`, `subfolder`, `dtype`, `device_map`, `attn_implementation`, ...) go to
    the base model's `from_pretrained`; `lorsa_subfolder` and `lorsa_revision` locate the Lorsa; `cache_dir`,
    `token` and `local_files_only` apply to both. The Lorsa is moved to the base model's device and dtype.

    A Lorsa published by llamascopium (one folder per layer, e.g. `lorsa_subfolder="lorsa/8x/k64"` of
    OpenMOSS-Team/Llama-Scope-2-Qwen3-1.7B) is converted against the loaded base model, only for `layers`.
    """
    source = base
    if not isinstance(base, PreTrainedModel):
        base = model_class.from_pretrained(base, **from_pretrained_kwargs)
    hub_kwargs = {key: from_pretrained_kwargs[key] for key in _SHARED_HUB_KWARGS if key in from_pretrained_kwargs}
    if lorsa is None:
        return _splice_recorded(base, source, hub_kwargs, from_pretrained_kwargs)
    if not isinstance(lorsa, LorsaForReplacement):
        lorsa = LorsaForReplacement.from_pretrained(  # a foreign Lorsa: only `layers`, folded against `base`
            lorsa, base_model=base, layers=layers, subfolder=lorsa_subfolder, revision=lorsa_revision, **hub_kwargs
        )
    return lorsa.splice(base, layers=layers, move=True)


def _splice_recorded(
    base: PreTrainedModel, source: Any, hub_kwargs: dict[str, Any], from_pretrained_kwargs: dict[str, Any]
) -> PreTrainedModel:
    """Splice back into `base` each Lorsa its config records, loaded from `source`'s subfolders."""
    record = getattr(base.config, RECORD_ATTRIBUTE, None)
    if isinstance(source, PreTrainedModel) or not record:
        raise ValueError(
            f"No Lorsa given and {source if not isinstance(source, PreTrainedModel) else 'this model'} records no "
            f"splice (config.{RECORD_ATTRIBUTE}): pass the Lorsa, load_spliced(base, lorsa)."
        )
    prefix = from_pretrained_kwargs.get("subfolder", "")
    for entry in record:
        lorsa = LorsaForReplacement.from_pretrained(
            source,
            subfolder=os.path.join(prefix, entry["subfolder"]) if prefix else entry["subfolder"],
            revision=from_pretrained_kwargs.get("revision"),
            **hub_kwargs,
        )
        lorsa.splice(base, layers=entry["layers"], move=True)
    return base


__all__ = ["load_spliced"]
