"""Import Lorsa checkpoints published by the two reference implementations (docs/method.md §6):

- llamascopium / lm-saes (`config.json` with `sae_type: "lorsa"` + `sae_weights.safetensors`),
- the paper-era OpenMOSS/Lorsa code (`config.json` + `final.pth`),

from a local folder or a Hub repo (repo id + subfolder + revision), one layer or one subfolder per layer, into a
`LorsaForReplacement` that, spliced into the Hugging Face base model, computes what the original code computed.

Layering: `detect` (which format a folder holds) and `conversion` (reading and folding into a config and state
dicts) import nothing of the model, so `LorsaForReplacement.from_pretrained(folder, base_model=...)` uses them to
convert on the fly. `converter.convert_checkpoint` (also `lorsa_hf.convert_checkpoint`) builds the model from
their result and sits above the model: this `__init__` does not import it.
"""

from .conversion import ConvertedLorsa, convert_if_foreign, convert_weights
from .detect import FOREIGN_FORMATS, foreign_format
from .foreign import CheckpointError, ForeignLorsa
from .llamascopium import read_llamascopium
from .paper_era import read_paper_era
from .report import ConversionReport, LayerReport

__all__ = [
    "FOREIGN_FORMATS",
    "CheckpointError",
    "ConversionReport",
    "ConvertedLorsa",
    "ForeignLorsa",
    "LayerReport",
    "convert_if_foreign",
    "convert_weights",
    "foreign_format",
    "read_llamascopium",
    "read_paper_era",
]
