"""The per-layer training step: each Lorsa layer's forward on a batch of activations, the reconstruction loss
(docs/method.md §3) and the auxiliary loss that gives dead heads a gradient (sparsify's AuxK)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..modeling_lorsa import LorsaForReplacement, LorsaLayer
from ..ops.decode import sparse_decode
from ..ops.selection import kept_activations, select_top_k
from .activations import LayerActivations
from .metrics import DeadHeadTracker


class LayerOutput(NamedTuple):
    """One layer's prediction, selected values and their head indices, and the dead-head reconstruction."""

    prediction: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor
    auxiliary: torch.Tensor | None


class LorsaLayerStep(nn.Module):
    """One Lorsa layer's training forward: its prediction, activations, and (given dead heads) the auxiliary
    reconstruction of the top `k_aux` dead heads. Everything that reads the layer's weights happens inside this
    forward, which makes it the unit FSDP gathers and shards."""

    def __init__(self, layer: LorsaLayer) -> None:
        super().__init__()
        self.layer = layer

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None, top_k: int,
        dead: torch.Tensor | None = None, k_aux: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        out = self.layer(hidden_states, attention_mask=attention_mask, output_activations=True, top_k=top_k)
        auxiliary = None
        if dead is not None:
            activation, W_O = self.layer.config.activation, self.layer.W_O.float()
            z = out.z.float().flatten(0, -2)  # [N, n_ov]
            indices = select_top_k(z, W_O.detach().norm(dim=-1), k_aux, activation, among=dead)
            auxiliary = sparse_decode(kept_activations(z, indices, activation), indices, W_O)
            auxiliary = auxiliary.view(*out.z.shape[:-1], -1)
        return out.hidden_states, out.top_k_values, out.top_k_indices, auxiliary


class LorsaTrainingModule(nn.Module):
    """Runs every trained Lorsa layer in one forward call (what DDP wraps; FSDP shards each `LorsaLayerStep`)."""

    def __init__(self, lorsa: LorsaForReplacement) -> None:
        super().__init__()
        self.steps = nn.ModuleDict({name: LorsaLayerStep(layer) for name, layer in lorsa.layers.items()})

    def forward(
        self, inputs: dict[str, torch.Tensor], attention_mask: torch.Tensor | None, top_k: int,
        auxiliary: dict[str, tuple[torch.Tensor, int]] | None = None,
    ) -> dict[str, tuple[torch.Tensor | None, ...]]:
        """`auxiliary` maps a layer to (dead-head mask, k_aux) for the layers whose dead heads get the
        auxiliary loss."""
        auxiliary = auxiliary or {}
        return {
            name: self.steps[name](hidden_states, attention_mask, top_k, *auxiliary.get(name, (None, 0)))
            for name, hidden_states in inputs.items()
        }


@dataclass
class Batch:
    """Activations of the layers this process trains, for the rows it trains them on."""

    activations: dict[int, LayerActivations]
    loss_mask: torch.Tensor
    attention_mask: torch.Tensor | None

    def only(self, layers: list[int]) -> Batch:
        return Batch({layer: self.activations[layer] for layer in layers}, self.loss_mask, self.attention_mask)


@dataclass
class AuxiliaryLoss:
    """The auxiliary dead-head loss's weight, heads (`k_aux`) and where their mask comes from."""

    coef: float
    k_aux: int
    tracker: DeadHeadTracker

    def inputs(self, layers: list[int], device: torch.device) -> dict[str, tuple[torch.Tensor, int]]:
        """(dead-head mask, heads to use) for each of `layers` that has dead heads, as the module takes them."""
        found = {}
        if self.coef > 0:
            for layer in layers:
                dead = self.tracker.dead(layer)
                if dead.any():
                    found[str(layer)] = (dead.to(device), min(self.k_aux, int(dead.sum())))
        return found


def run_layers(
    module: nn.Module, batch: Batch, top_k: int, autocast: Callable[[], AbstractContextManager],
    auxiliary: dict[str, tuple[torch.Tensor, int]] | None = None,
) -> dict[int, LayerOutput]:
    """Every layer of `batch` through `module` (a `LorsaTrainingModule`, possibly wrapped)."""
    inputs = {str(layer): acts.inputs for layer, acts in batch.activations.items()}
    with autocast():
        outputs = module(inputs=inputs, attention_mask=batch.attention_mask, top_k=top_k, auxiliary=auxiliary or {})
    return {int(name): LayerOutput(*value) for name, value in outputs.items()}


def aux_loss(
    reconstruction: torch.Tensor, error: torch.Tensor, target: torch.Tensor, dead_count: int, k_aux: int
) -> torch.Tensor:
    """How well the top `k_aux` dead heads fit the (detached) residual error, over the target variance,
    scaled by min(dead / k_aux, 1) (sparsify's AuxK); all on the loss tokens."""
    residual = -error.detach()
    variance = (target - target.mean(0)).pow(2).sum().clamp(min=1e-12)
    scale = min(dead_count / k_aux, 1.0)
    return scale * (reconstruction.float() - residual).pow(2).sum() / variance


def training_loss(
    batch: Batch, outputs: dict[int, LayerOutput], scale: torch.Tensor, auxiliary: AuxiliaryLoss
) -> torch.Tensor:
    """Squared error over the loss tokens times `scale` (1 / (global loss tokens x d), times the number of
    replicas that average gradients), summed over layers, plus the auxiliary dead-head loss."""
    mask = batch.loss_mask
    loss = torch.zeros((), device=mask.device)
    for layer, output in outputs.items():
        target = batch.activations[layer].outputs
        error = (output.prediction.float() - target)[mask]
        loss = loss + error.pow(2).sum() * scale.float()
        if output.auxiliary is not None:
            dead_count = int(auxiliary.tracker.dead(layer).sum())
            aux = aux_loss(output.auxiliary[mask], error, target[mask], dead_count, auxiliary.k_aux)
            loss = loss + auxiliary.coef * aux
    return loss


__all__ = [
    "AuxiliaryLoss", "Batch", "LayerOutput", "LorsaLayerStep", "LorsaTrainingModule", "aux_loss", "run_layers",
    "training_loss",
]
