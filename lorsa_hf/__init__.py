"""lorsa_hf: Low-Rank Sparse Attention (Lorsa) for Hugging Face transformers.

Importing the package registers `LorsaConfig` / `LorsaForReplacement` with the transformers Auto classes
(`model_type = "lorsa"`).
"""

from transformers import AutoConfig, AutoModel

from .configuration_lorsa import LorsaConfig
from .convert import CheckpointError, ConversionReport, convert_checkpoint
from .embedded import embedded_corpus, load_embedded_model
from .modeling_lorsa import LorsaForReplacement, LorsaLayerOutput
from .splicing import load_spliced, spliced_layers, unsplice

__version__ = "0.1.0"

AutoConfig.register(LorsaConfig.model_type, LorsaConfig, exist_ok=True)
AutoModel.register(LorsaConfig, LorsaForReplacement, exist_ok=True)

__all__ = [
    "CheckpointError",
    "ConversionReport",
    "LorsaConfig",
    "LorsaForReplacement",
    "LorsaLayerOutput",
    "convert_checkpoint",
    "embedded_corpus",
    "load_embedded_model",
    "load_spliced",
    "spliced_layers",
    "unsplice",
    "__version__",
]
