"""Training Lorsas (docs/method.md §3): text and packing, activation source, trainer, initialisations,
checkpoints, recipes."""

from .activations import ActivationSource
from .data import FileTextSource, HFDatasetSource, ListTextSource, PackerState, SequencePacker, TextSource
from .recipe import Recipe, RecipeError, load_recipe, recipe_from_dict
from .trainer import LorsaTrainer, train_from_recipe

__all__ = [
    "ActivationSource",
    "FileTextSource",
    "HFDatasetSource",
    "ListTextSource",
    "LorsaTrainer",
    "PackerState",
    "Recipe",
    "RecipeError",
    "SequencePacker",
    "TextSource",
    "load_recipe",
    "recipe_from_dict",
    "train_from_recipe",
]
