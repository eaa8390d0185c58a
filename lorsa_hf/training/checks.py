"""What a recipe must satisfy against the base model and the process group before training starts: each check
names the setting at fault and the value that would work."""

from __future__ import annotations

from transformers import PreTrainedModel

from ..adapters import get_adapter
from .recipe import Recipe, RecipeError, TrainingSection


def check_model_fits(recipe: Recipe, model: PreTrainedModel) -> None:
    """Refuse a recipe whose rows the base model cannot read as the spliced layers will."""
    check_context_length(recipe, model)
    check_sliding_window(recipe, model)


def check_batch_split(recipe: Recipe, world_size: int) -> None:
    if recipe.data.batch_size % world_size:
        raise RecipeError(
            f"data.batch_size ({recipe.data.batch_size}) must be divisible by the number of processes "
            f"({world_size}): each process takes an equal slice of every batch."
        )


def check_context_length(recipe: Recipe, model: PreTrainedModel) -> None:
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and recipe.data.context_length > positions:
        raise RecipeError(
            f"data.context_length ({recipe.data.context_length}) is beyond the {positions} positions "
            f"of the base model {recipe.model.name}; use at most {positions}."
        )


def check_sliding_window(recipe: Recipe, model: PreTrainedModel) -> None:
    """Training feeds the Lorsa plain causal attention; spliced, it reads the base layer's window. The two
    agree only while every training row fits inside the window."""
    context_length = recipe.data.context_length
    adapter = get_adapter(model)
    for layer in recipe.lorsa.layers:
        window = adapter.sliding_window(model.config, layer)
        if window is not None and context_length > window:
            raise RecipeError(
                f"Layer {layer} of {recipe.model.name} attends over a sliding window of {window} tokens, "
                f"shorter than data.context_length ({context_length}): the Lorsa would train on keys the "
                f"spliced layer never reads. Use data.context_length <= {window}."
            )


def check_k(training: TrainingSection, n_ov_heads: int) -> None:
    for name, k in (("training.k_initial", training.k_initial), ("training.k_aux", training.k_aux)):
        if k is not None and not 0 < k <= n_ov_heads:
            raise RecipeError(f"{name} must be between 1 and lorsa n_ov_heads ({n_ov_heads}), got {k}.")
