"""lorsa_hf: Low-Rank Sparse Attention (Lorsa) for Hugging Face transformers.

Importing the package registers `LorsaConfig` / `LorsaForReplacement` with the transformers Auto classes
(`model_type = "lorsa"`). The embedded model and corpus (`load_embedded_model`, `embedded_corpus`) are loaded on
first access only, so importing the package never touches their GGUF and pip machinery.
"""

import importlib
from typing import Any

from transformers import AutoConfig, AutoModel

from .configuration_lorsa import LorsaConfig
from .convert import CheckpointError, ConversionReport
from .convert.converter import convert_checkpoint
from .load_checks import LorsaLoadError
from .loading import load_spliced
from .modeling_lorsa import LorsaForReplacement, LorsaLayerOutput
from .shipped import load_pretrained_default, pretrained_default_dir
from .splicing import spliced_layers, unsplice

__version__ = "0.1.0"

AutoConfig.register(LorsaConfig.model_type, LorsaConfig, exist_ok=True)
AutoModel.register(LorsaConfig, LorsaForReplacement, exist_ok=True)

_LAZY = {"embedded_corpus": ".embedded.corpus", "load_embedded_model": ".embedded.model"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name], __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "CheckpointError",
    "ConversionReport",
    "LorsaConfig",
    "LorsaForReplacement",
    "LorsaLayerOutput",
    "LorsaLoadError",
    "convert_checkpoint",
    "embedded_corpus",
    "load_embedded_model",
    "load_pretrained_default",
    "load_spliced",
    "pretrained_default_dir",
    "spliced_layers",
    "unsplice",
    "__version__",
]
