"""What can stand in an attention slot during an eval: a Lorsa, the original block, or an ablation.

Every metric in this package takes a mapping `{layer: module}` of replacements. A replacement is called exactly
like the attention module it replaces (same positional and keyword arguments) and returns `(output, None)`, so
the original module itself is a valid replacement: that is the identity check the metrics are tested with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..adapters import get_adapter
from ..modeling_lorsa import LorsaForReplacement, LorsaLayerOutput
from ..splicing import LorsaSplicedAttention, lorsa_attention_modules, spliced_layers


def _hidden_states(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The block input, which transformers passes as `hidden_states=` or as the first positional argument."""
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    raise TypeError("The attention module was called without hidden_states; cannot ablate its output.")


class ZeroAblation(nn.Module):
    """Replaces an attention block's output with zeros."""

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(_hidden_states(args, kwargs)), None


class MeanAblation(nn.Module):
    """Replaces an attention block's output with a fixed vector: its mean over tokens of a separate data slice."""

    def __init__(self, mean: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone(), persistent=False)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        hidden = _hidden_states(args, kwargs)
        return self.mean.to(device=hidden.device, dtype=hidden.dtype).expand(hidden.shape).clone(), None


def lorsa_replacements(
    model: PreTrainedModel, lorsa: LorsaForReplacement, layers: list[int] | None = None
) -> dict[int, LorsaSplicedAttention]:
    """Lorsa layers wrapped to stand in `model`'s attention slots, without putting them there yet.

    They compute exactly what `lorsa.splice(model)` would; the base model is left untouched. The Lorsa must be
    on the model's device and dtype.
    """
    layers = list(lorsa.config.layers if layers is None else layers)
    if spliced_layers(model):
        raise ValueError(
            f"The base model already has a Lorsa spliced into layers {spliced_layers(model)}; evaluate the clean "
            "model (unsplice it first, e.g. lorsa_hf.unsplice(model))."
        )
    return lorsa_attention_modules(lorsa, model, layers)


def original_attention(model: PreTrainedModel, layers: list[int]) -> dict[int, nn.Module]:
    """The model's own attention modules: the identity replacement (loss recovered 1, FVU 0)."""
    adapter = get_adapter(model)
    return {layer: adapter.get_attention(model, layer) for layer in layers}


@contextlib.contextmanager
def replaced_attention(model: PreTrainedModel, replacements: Mapping[int, nn.Module]) -> Iterator[PreTrainedModel]:
    """Put `replacements` in the attention slots of `model` for the duration of the block, then restore the
    original modules (also on error). The replacements run instead of the originals, with the model's cache."""
    adapter = get_adapter(model)
    originals = {layer: adapter.get_attention(model, layer) for layer in replacements}
    try:
        for layer, module in replacements.items():
            adapter.set_attention(model, layer, module)
        yield model
    finally:
        for layer, module in originals.items():
            adapter.set_attention(model, layer, module)


AttentionHook = Callable[[int, tuple[Any, ...], dict[str, Any], Any], None]


@contextlib.contextmanager
def attention_hooks(model: PreTrainedModel, layers: list[int], hook: AttentionHook) -> Iterator[None]:
    """Call `hook(layer, args, kwargs, output)` after each attention module of `layers` runs (its output unchanged).

    Calls of the same module made from inside the hook (the original block used as its own replacement) do not
    trigger it again.
    """
    adapter = get_adapter(model)
    handles = []
    running: set[int] = set()
    try:
        for layer in layers:

            def forward_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any, layer: int = layer) -> None:
                if layer in running:
                    return
                running.add(layer)
                try:
                    hook(layer, args, kwargs, output)
                finally:
                    running.discard(layer)

            handles.append(adapter.get_attention(model, layer).register_forward_hook(forward_hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_replacement(
    replacement: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[torch.Tensor, LorsaLayerOutput | None]:
    """Call a replacement on an attention call's arguments; for a Lorsa, also return its activations."""
    if not isinstance(replacement, LorsaSplicedAttention):
        return replacement(*args, **kwargs)[0], None
    captured: dict[str, LorsaLayerOutput] = {}

    def request_activations(module: nn.Module, a: tuple, kw: dict) -> tuple[tuple, dict]:
        return a, {**kw, "output_activations": True}

    def keep_output(module: nn.Module, a: tuple, kw: dict, output: LorsaLayerOutput) -> None:
        captured["output"] = output

    pre = replacement.lorsa.register_forward_pre_hook(request_activations, with_kwargs=True)
    post = replacement.lorsa.register_forward_hook(keep_output, with_kwargs=True)
    try:
        prediction = replacement(*args, **kwargs)[0]
    finally:
        pre.remove()
        post.remove()
    if "output" not in captured:
        raise RuntimeError("The spliced Lorsa did not run its layer module; cannot read its activations.")
    return prediction, captured["output"]


__all__ = [
    "MeanAblation",
    "ZeroAblation",
    "attention_hooks",
    "lorsa_replacements",
    "original_attention",
    "replaced_attention",
    "run_replacement",
]
