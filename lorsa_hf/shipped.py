"""The Lorsa that ships inside the package: SmolLM2-135M layers trained with the bundled recipe, a normal
`LorsaForReplacement` folder (bf16 weights, recipe, results.json, card) found with `importlib.resources`."""

from __future__ import annotations

from pathlib import Path

import torch

from .modeling_lorsa import LorsaForReplacement
from .resources import bundled_dir

DEFAULT_LORSA = "smollm2-135m-lorsa"
SHIP_COMMAND = "lorsa-hf ship RUN/final lorsa_hf/pretrained/smollm2-135m-lorsa"


def pretrained_default_dir(name: str = DEFAULT_LORSA) -> Path:
    """The folder of the shipped Lorsa `name` inside the installed package."""
    try:
        return bundled_dir("pretrained", name)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"The shipped Lorsa {name!r} is not in this installation of lorsa_hf (lorsa_hf/pretrained/{name}). A "
            f"checkout builds it from a training run with `{SHIP_COMMAND}`; or train one yourself with "
            "`lorsa-hf demo --train`."
        ) from error


def load_pretrained_default(name: str = DEFAULT_LORSA, dtype: torch.dtype = torch.float32) -> LorsaForReplacement:
    """The shipped Lorsa for the embedded SmolLM2-135M (`lorsa_hf.load_embedded_model()`), in `dtype`, in eval
    mode: `load_pretrained_default().splice(model)` puts it in place of the model's attention blocks."""
    return LorsaForReplacement.from_pretrained(pretrained_default_dir(name), dtype=dtype).eval()


__all__ = ["DEFAULT_LORSA", "SHIP_COMMAND", "load_pretrained_default", "pretrained_default_dir"]
