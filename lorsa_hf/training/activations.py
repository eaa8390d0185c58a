"""Activations to train on: the frozen base model, and its attention inputs and outputs for a batch of rows.

`ActivationSource` runs the frozen base model on a batch of rows, captures the attention module's input and
output for every requested layer with hooks, and stops the forward after the deepest requested layer.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..adapters import get_adapter
from .recipe import Recipe

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _StopForward(Exception):
    """Raised by the hook on the deepest requested layer: nothing after it needs to run."""


@dataclass
class LayerActivations:
    """One layer's attention input `x` and output `y`, both [B, T, d]."""

    inputs: torch.Tensor
    outputs: torch.Tensor


class ActivationSource:
    """Run a frozen base model and capture the attention blocks' inputs and outputs of `layers`.

    The model is put in eval mode with gradients off. Only the decoder layers up to the deepest requested one
    run: a hook on that layer's attention module stops the forward once its output is captured.
    """

    def __init__(self, model: PreTrainedModel, layers: Iterable[int], dtype: torch.dtype = torch.float32) -> None:
        self.model = model.eval().requires_grad_(False)
        self.adapter = get_adapter(model)
        self.layers = sorted(set(layers))
        self.dtype = dtype
        count = len(self.adapter.decoder_layers(model))
        for layer in self.layers:
            if not 0 <= layer < count:
                raise ValueError(f"Layer {layer} does not exist: the base model has layers 0..{count - 1}.")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, LayerActivations]:
        captured_inputs: dict[int, torch.Tensor] = {}
        captured: dict[int, LayerActivations] = {}
        deepest = self.layers[-1]
        handles = []

        def pre_hook(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
                captured_inputs[layer] = hidden.detach().to(self.dtype, copy=True)

            return hook

        def post_hook(layer: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
                result = output[0] if isinstance(output, tuple) else output
                result = result.detach().to(self.dtype, copy=True)
                captured[layer] = LayerActivations(captured_inputs.pop(layer), result)
                if layer == deepest:
                    raise _StopForward

            return hook

        for layer in self.layers:
            attention = self.adapter.get_attention(self.model, layer)
            handles.append(attention.register_forward_pre_hook(pre_hook(layer), with_kwargs=True))
            handles.append(attention.register_forward_hook(post_hook(layer), with_kwargs=True))
        device = next(self.model.parameters()).device
        try:
            self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [layer for layer in self.layers if layer not in captured]
        if missing:
            raise RuntimeError(f"The base model's forward never reached the attention module of layers {missing}.")
        return captured


def load_base_model(recipe: Recipe) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The recipe's base model (frozen, eval mode, in `model.dtype`) and its tokenizer."""
    dtype = DTYPES[recipe.model.dtype]
    if recipe.model.name == "embedded":
        from ..embedded import load_embedded_model

        return load_embedded_model(dtype=dtype, cache_dir=recipe.model.cache_dir)
    kwargs: dict[str, Any] = {"revision": recipe.model.revision, "cache_dir": recipe.model.cache_dir}
    if recipe.model.attn_implementation:
        kwargs["attn_implementation"] = recipe.model.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(recipe.model.name, dtype=dtype, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.name, revision=recipe.model.revision)
    return model, tokenizer


__all__ = ["DTYPES", "ActivationSource", "LayerActivations", "load_base_model"]
