"""Downstream metrics: next-token cross-entropy of the model with attention blocks replaced, loss recovered
against zero- and mean-ablation, and KL(clean ‖ replaced) per token (docs/method.md §4).

A prediction counts when both the position it is made at and the token it predicts are counted positions (not
BOS, not padding). Sums are float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .data import position_mask
from .replacements import MeanAblation, ZeroAblation, attention_hooks, replaced_attention

CONDITIONS = ("spliced", "zero", "mean")
"""What stands in the attention slots: the replacement under test, zeros, or the mean block output."""


def loss_recovered(ce_clean: float, ce_replaced: float, ce_ablated: float) -> float:
    """(CE_ablated − CE_replaced) / (CE_ablated − CE_clean): 1 when the replacement is as good as the original
    block, 0 when it is no better than the ablation. NaN when the ablation does not change the loss."""
    gap = ce_ablated - ce_clean
    return (ce_ablated - ce_replaced) / gap if gap != 0 else math.nan


def default_layer_sets(layers: Sequence[int]) -> dict[str, list[int]]:
    """Each layer on its own, plus all of them at once (`"all"`) when there are several."""
    sets = {str(layer): [layer] for layer in sorted(layers)}
    if len(layers) > 1:
        sets["all"] = sorted(layers)
    return sets


@torch.no_grad()
def attention_output_means(
    model: PreTrainedModel,
    layers: Sequence[int],
    batches: Iterable[torch.Tensor],
    exclude_token_ids: Sequence[int] = (),
    progress: bool = False,
) -> tuple[dict[int, torch.Tensor], int]:
    """Mean output of each attention block of `layers` over the counted tokens of `batches` (clean model), in
    float64, and the number of tokens it was taken over. Use data disjoint from the eval data."""
    sums = {layer: torch.zeros(model.config.hidden_size, dtype=torch.float64) for layer in layers}
    state: dict[str, Any] = {"n": 0}

    def hook(layer: int, args: tuple, kwargs: dict, output: Any) -> None:
        block = output[0] if isinstance(output, tuple) else output
        sums[layer] += block[state["mask"].to(block.device)].detach().to("cpu", torch.float64).sum(0)

    device = next(model.parameters()).device
    with attention_hooks(model, list(layers), hook):
        for input_ids in tqdm(list(batches), desc="mean ablation statistics", disable=not progress, leave=False):
            state["mask"] = position_mask(input_ids, exclude_token_ids)
            state["n"] += int(state["mask"].sum())
            model(input_ids=input_ids.to(device), use_cache=False)
    if state["n"] == 0:
        raise ValueError("No tokens for the mean-ablation statistics: give a non-empty, separate slice of data.")
    return {layer: total / state["n"] for layer, total in sums.items()}, state["n"]


def _log_probs(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1)


@torch.no_grad()
def downstream_metrics(
    model: PreTrainedModel,
    replacements: Mapping[int, nn.Module],
    batches: Iterable[torch.Tensor],
    means: Mapping[int, torch.Tensor] | None = None,
    layer_sets: Mapping[str, Sequence[int]] | None = None,
    exclude_token_ids: Sequence[int] = (),
    progress: bool = False,
) -> dict[str, Any]:
    """CE of the clean model and, for each set of layers (default: each layer, then all), of the model with
    those blocks replaced by `replacements`, by zeros and (when `means` are given) by their mean output; loss
    recovered against both ablations and KL(clean ‖ replaced) per counted token.

    `batches` are input ids [B, T] of packed text; `replacements` map a layer to a module called like its
    attention block (a spliced Lorsa, the original block, an ablation).
    """
    layer_sets = dict(default_layer_sets(list(replacements)) if layer_sets is None else layer_sets)
    for name, layers in layer_sets.items():
        missing = [layer for layer in layers if layer not in replacements]
        if missing:
            raise ValueError(f"Layer set {name!r} includes layers {missing} that have no replacement.")
    ablations = {"zero": {layer: ZeroAblation() for layer in replacements}}
    if means is not None:
        ablations["mean"] = {layer: MeanAblation(means[layer]) for layer in replacements}
    conditions = [c for c in CONDITIONS if c == "spliced" or c in ablations]
    sums = {(name, condition): [0.0, 0.0] for name in layer_sets for condition in conditions}
    ce_clean_sum, n_tokens = 0.0, 0
    device = next(model.parameters()).device

    for input_ids in tqdm(list(batches), desc="downstream loss", disable=not progress, leave=False):
        mask = position_mask(input_ids, exclude_token_ids)
        counted = (mask[:, :-1] & mask[:, 1:]).to(device)
        input_ids = input_ids.to(device)
        targets = input_ids[:, 1:].unsqueeze(-1)
        clean = _log_probs(model, input_ids)
        ce_clean_sum += -clean.gather(-1, targets).squeeze(-1)[counted].double().sum().item()
        n_tokens += int(counted.sum())
        p_clean = clean.exp()
        for name, layers in layer_sets.items():
            for condition in conditions:
                source = replacements if condition == "spliced" else ablations[condition]
                with replaced_attention(model, {layer: source[layer] for layer in layers}):
                    replaced = _log_probs(model, input_ids)
                sums[name, condition][0] += -replaced.gather(-1, targets).squeeze(-1)[counted].double().sum().item()
                kl = (p_clean * (clean - replaced)).sum(-1)
                sums[name, condition][1] += kl[counted].double().sum().item()

    if n_tokens == 0:
        raise ValueError("No predictions were counted: every position was excluded or no batch was given.")
    ce_clean = ce_clean_sum / n_tokens
    results: dict[str, Any] = {"n_tokens": n_tokens, "ce_clean": ce_clean, "layer_sets": {}}
    for name, layers in layer_sets.items():
        entry: dict[str, Any] = {"layers": list(layers)}
        for condition in CONDITIONS:
            measured = (name, condition) in sums
            entry[f"ce_{condition}"] = sums[name, condition][0] / n_tokens if measured else None
            entry[f"kl_{condition}"] = sums[name, condition][1] / n_tokens if measured else None
        entry["ce_increase"] = entry["ce_spliced"] - ce_clean
        for ablation in ("zero", "mean"):
            ablated = entry[f"ce_{ablation}"]
            entry[f"loss_recovered_{ablation}"] = (
                None if ablated is None else loss_recovered(ce_clean, entry["ce_spliced"], ablated)
            )
        results["layer_sets"][name] = entry
    return results


__all__ = ["CONDITIONS", "attention_output_means", "default_layer_sets", "downstream_metrics", "loss_recovered"]
