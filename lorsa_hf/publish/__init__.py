"""Shipping a trained Lorsa: a training run's `final/` folder made into a published folder (bf16 weights, the
recipe, `results.json` from the eval suite, the card), and such a folder pushed to the Hub."""

from .push import check_loadable, push_folder
from .ship import ship_run

__all__ = ["check_loadable", "push_folder", "ship_run"]
