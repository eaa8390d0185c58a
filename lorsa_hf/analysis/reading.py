"""Run a base model with a Lorsa in one layer's attention slot, up to that layer only, and read what the Lorsa
layer received and computed there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..modeling_lorsa import LorsaForReplacement, LorsaLayer, LorsaLayerOutput
from ..splicing import spliced_layers


class _StopForward(Exception):
    """Raised once the analysed layer has run: nothing after it is needed."""


@dataclass
class LayerRead:
    """The Lorsa layer's call in a base-model forward: its arguments and its output with activations."""

    hidden_states: torch.Tensor
    arguments: dict[str, Any]
    output: LorsaLayerOutput


def request_activations(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A forward pre-hook (with kwargs) that makes a Lorsa layer also return z and its kept activations."""
    return args, {**kwargs, "output_activations": True}


def check_layer(lorsa: LorsaForReplacement, layer: int) -> LorsaLayer:
    """The Lorsa layer for base-model layer `layer`, or an error that names the layers it does replace."""
    if str(layer) not in lorsa.layers:
        raise ValueError(
            f"This Lorsa does not replace layer {layer}: it replaces layers {lorsa.config.layers}. "
            "Pass one of those (--layer)."
        )
    return lorsa.layer(layer)


@contextlib.contextmanager
def spliced_at(model: PreTrainedModel, lorsa: LorsaForReplacement, layer: int) -> Iterator[LorsaLayer]:
    """`model` with `lorsa`'s layer `layer` in its attention slot for the duration (left as found: a layer the
    caller spliced stays spliced)."""
    module = check_layer(lorsa, layer)
    if layer in spliced_layers(model):
        yield module
        return
    lorsa.splice(model, layers=[layer], move=True)
    try:
        yield module
    finally:
        lorsa.unsplice(model)


class LayerReader:
    """Calls a model (with the Lorsa spliced at `layer`) up to that layer and returns the Lorsa layer's call.

    The forward stops right after the Lorsa layer, so the decoder layers above it never run.
    """

    def __init__(self, model: PreTrainedModel, module: LorsaLayer) -> None:
        self.model = model.eval()
        self.module = module

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> LayerRead:
        read: dict[str, Any] = {}

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            read["hidden_states"] = hidden
            read["arguments"] = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "cache")}
            return args, {**kwargs, "output_activations": True}

        def post_hook(module: nn.Module, args: tuple, kwargs: dict, output: LorsaLayerOutput) -> None:
            read["output"] = output
            raise _StopForward

        handles = [
            self.module.register_forward_pre_hook(pre_hook, with_kwargs=True),
            self.module.register_forward_hook(post_hook, with_kwargs=True),
        ]
        device = self.module.W_Q.device
        try:
            mask = None if attention_mask is None else attention_mask.to(device)
            self.model(input_ids=input_ids.to(device), attention_mask=mask, use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        if "output" not in read:
            raise RuntimeError(f"The model's forward never reached the Lorsa layer {self.module.layer_idx}.")
        read["arguments"].pop("output_activations", None)
        return LayerRead(read["hidden_states"], read["arguments"], read["output"])


__all__ = ["LayerRead", "LayerReader", "check_layer", "request_activations", "spliced_at"]
