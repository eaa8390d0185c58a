"""Downstream metrics: next-token cross-entropy of the model with attention blocks replaced, loss recovered
against zero- and mean-ablation, and KL(clean ‖ replaced) per token (docs/method.md §4).

A prediction counts when both the position it is made at and the token it predicts are counted positions (not
BOS, not padding). Sums are float64.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..adapters import get_adapter
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


class _Skipped(nn.Module):
    """Stands in for a decoder layer below the first replaced one: passes its input through, or, as the last
    skipped layer, returns the clean residual stream that enters the first replaced layer."""

    def __init__(self, residual: torch.Tensor | None = None) -> None:
        super().__init__()
        self.residual = residual

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states if self.residual is None else self.residual


@contextlib.contextmanager
def resumed_at(model: PreTrainedModel, layer: int, residual: torch.Tensor | None) -> Iterator[None]:
    """Within the block, a forward of `model` runs only the decoder layers from `layer` on, starting from
    `residual` (the clean residual stream entering `layer`, from a forward on the same input ids): the layers
    below `layer` are skipped. The logits are those of a full forward with the same modules in place."""
    if layer == 0:
        yield
        return
    if residual is None:
        raise ValueError(f"Resuming at layer {layer} needs the residual stream that enters it.")
    decoder_layers = get_adapter(model).decoder_layers(model)
    originals = [decoder_layers[index] for index in range(layer)]
    try:
        for index in range(layer):
            decoder_layers[index] = _Skipped(residual if index == layer - 1 else None)
        yield
    finally:
        for index, module in enumerate(originals):
            decoder_layers[index] = module


@contextlib.contextmanager
def residual_streams(model: PreTrainedModel, layers: Iterable[int], into: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record, in `into[l]`, the residual stream entering decoder layer `l` (the output of layer `l - 1`) for
    each of `layers` above 0, during the forwards run inside the block."""
    decoder_layers = get_adapter(model).decoder_layers(model)
    handles = []

    def keep(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            into[layer] = output[0] if isinstance(output, tuple) else output

        return hook

    try:
        for layer in sorted(set(layers) - {0}):
            handles.append(decoder_layers[layer - 1].register_forward_hook(keep(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Σ_v a[..., v] b[..., v] for [B, T, V] tensors, without building their product."""
    rows = a.shape[0] * a.shape[1]
    return torch.bmm(a.reshape(rows, 1, -1), b.reshape(rows, -1, 1)).view(a.shape[:2])


@dataclass
class CleanLogits:
    """The clean model's next-token distribution on one batch, held once for every condition compared to it:
    the logits, their log-normaliser, the probabilities (the only vocabulary-sized tensor kept besides the
    logits) and Σ p log p."""

    logits: torch.Tensor
    targets: torch.Tensor
    log_normalizer: torch.Tensor
    probs: torch.Tensor
    neg_entropy: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, targets: torch.Tensor) -> CleanLogits:
        logits = logits.float()
        log_normalizer = torch.logsumexp(logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        return cls(logits, targets, log_normalizer, probs, _row_dot(probs, logits) - log_normalizer)

    def cross_entropy(self) -> torch.Tensor:
        """−log p_clean(target) per position [B, T]."""
        return self.log_normalizer - self.logits.gather(-1, self.targets).squeeze(-1)

    def compare(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """CE of `logits` and KL(clean ‖ logits) per position [B, T], from the logits alone: with
        lse = logsumexp(logits), CE = lse − logits[target] and KL = Σ p log p − (Σ p·logits − lse)."""
        logits = logits.float()
        log_normalizer = torch.logsumexp(logits, dim=-1)
        ce = log_normalizer - logits.gather(-1, self.targets).squeeze(-1)
        kl = self.neg_entropy - (_row_dot(self.probs, logits) - log_normalizer)
        return ce, kl


def _next_token_targets(input_ids: torch.Tensor, counted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets [B, T, 1] (the next token; 0 at the last position) and which predictions count [B, T] (both the
    position and the token it predicts counted; never the last position), so that logits stay unsliced."""
    targets = torch.zeros_like(input_ids)
    targets[:, :-1] = input_ids[:, 1:]
    predictions = torch.zeros_like(counted)
    predictions[:, :-1] = counted[:, :-1] & counted[:, 1:]
    return targets.unsqueeze(-1), predictions


def _check_layer_sets(layer_sets: Mapping[str, Sequence[int]], replacements: Mapping[int, nn.Module]) -> None:
    for name, layers in layer_sets.items():
        missing = [layer for layer in layers if layer not in replacements]
        if missing:
            raise ValueError(f"Layer set {name!r} includes layers {missing} that have no replacement.")
        if not layers:
            raise ValueError(f"Layer set {name!r} is empty: give each set at least one layer.")


def _summarise(
    sums: dict[tuple[str, str], list[float]], ce_clean_sum: float, n_tokens: int,
    layer_sets: Mapping[str, Sequence[int]],
) -> dict[str, Any]:
    """Per-token means, the CE increase and loss recovered against each ablation, per layer set."""
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
    attention block (a spliced Lorsa, the original block, an ablation). Each condition reruns only the layers
    from the set's first replaced one, on the clean run's residual stream there, and CE and KL come from the
    logits through their log-normaliser (no log-probability tensor per condition).
    """
    layer_sets = dict(default_layer_sets(list(replacements)) if layer_sets is None else layer_sets)
    _check_layer_sets(layer_sets, replacements)
    sources: dict[str, Mapping[int, nn.Module]] = {"spliced": replacements}
    sources["zero"] = {layer: ZeroAblation() for layer in replacements}
    if means is not None:
        sources["mean"] = {layer: MeanAblation(means[layer]) for layer in replacements}
    sums = {(name, condition): [0.0, 0.0] for name in layer_sets for condition in CONDITIONS if condition in sources}
    ce_clean_sum, n_tokens = 0.0, 0
    device = next(model.parameters()).device
    starts = {min(layers) for layers in layer_sets.values()}

    for input_ids in tqdm(list(batches), desc="downstream loss", disable=not progress, leave=False):
        input_ids = input_ids.to(device)
        targets, counted = _next_token_targets(input_ids, position_mask(input_ids, exclude_token_ids))
        residuals: dict[int, torch.Tensor] = {}
        with residual_streams(model, starts, residuals):
            clean = CleanLogits.from_logits(model(input_ids=input_ids, use_cache=False).logits, targets)
        ce_clean_sum += clean.cross_entropy()[counted].double().sum().item()
        n_tokens += int(counted.sum())
        for name, condition in sums:
            layers = layer_sets[name]
            start = min(layers)
            with replaced_attention(model, {layer: sources[condition][layer] for layer in layers}):
                with resumed_at(model, start, residuals.get(start)):
                    ce, kl = clean.compare(model(input_ids=input_ids, use_cache=False).logits)
            sums[name, condition][0] += ce[counted].double().sum().item()
            sums[name, condition][1] += kl[counted].double().sum().item()
        del clean, residuals
    return _summarise(sums, ce_clean_sum, n_tokens, layer_sets)


__all__ = [
    "CONDITIONS",
    "CleanLogits",
    "attention_output_means",
    "default_layer_sets",
    "downstream_metrics",
    "loss_recovered",
    "residual_streams",
    "resumed_at",
]
