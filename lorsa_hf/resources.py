"""Files shipped inside the package (the training recipes, the lm-eval task definitions).

They are found with `importlib.resources`, so that a checkout, an editable install and an installed wheel all
resolve them the same way; the readers (the recipe loader, lm-eval's TaskManager) need them as real files.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def bundled_dir(*parts: str) -> Path:
    """The folder `lorsa_hf/<parts>` shipped with the package, as a filesystem path."""
    folder = resources.files("lorsa_hf")
    for part in parts:
        folder = folder / part
    if not isinstance(folder, Path) or not folder.is_dir():
        where = "/".join(("lorsa_hf", *parts))
        raise FileNotFoundError(
            f"The package's bundled folder {where} is missing or not on the filesystem ({folder!r}): reinstall "
            "lorsa-hf from a wheel or a checkout (pip install lorsa-hf, or pip install -e .), not from a zip."
        )
    return folder
