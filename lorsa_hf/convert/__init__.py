"""Import Lorsa checkpoints published by the two reference implementations (docs/method.md §6):

- llamascopium / lm-saes (`config.json` with `sae_type: "lorsa"` + `sae_weights.safetensors`),
- the paper-era OpenMOSS/Lorsa code (`config.json` + `final.pth`),

from a local folder or a Hub repo (repo id + subfolder + revision), one layer or one subfolder per layer, into a
`LorsaForReplacement` that, spliced into the Hugging Face base model, computes what the original code computed.
`LorsaForReplacement.from_pretrained(folder, base_model=...)` calls this on the fly.
"""

from .converter import FOREIGN_FORMATS, Conversion, convert_checkpoint, foreign_format
from .foreign import CheckpointError, ForeignLorsa
from .llamascopium import read_llamascopium
from .paper_era import read_paper_era
from .report import ConversionReport, LayerReport

__all__ = [
    "FOREIGN_FORMATS",
    "CheckpointError",
    "Conversion",
    "ConversionReport",
    "ForeignLorsa",
    "LayerReport",
    "convert_checkpoint",
    "foreign_format",
    "read_llamascopium",
    "read_paper_era",
]
