"""What the head detectors read from a layer's heads, in one form for Lorsa heads and for base-model heads.

For each head: the attention `pattern` of its group at each query s and key t, and per query the `strength` of
the head's output (the norm of what it writes there). `promotion(tokens)` says how much the head's actual output
at each position lifts the logit of a given token, in standard deviations over the vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel

from ..adapters import get_adapter
from ..modeling_lorsa import LorsaLayer
from ..splicing import spliced_layers
from .logits import Unembedding
from .zpattern import z_pattern

LayerInputs = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
"""(input ids [B, T], attention mask [B, T]) -> the analysed layer's input [B, T, d] and the other arguments
its forward receives."""


@dataclass
class HeadReadings:
    """pattern [B, G, T, S] per group; strength [B, G, T, g] per head (head index group * g + j); promotion:
    tokens [B, T] -> [B, G, T, g]."""

    pattern: torch.Tensor
    strength: torch.Tensor
    promotion: Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def lorsa_readings(
    module: LorsaLayer, inputs: LayerInputs, unembedding: Unembedding, input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> HeadReadings:
    """Readings of every head of a Lorsa layer: its group's pattern (from `z_pattern`, the layer's own code) and
    its kept activation times ||W_O[i]|| as strength (a head that TopK did not keep has none there)."""
    hidden_states, arguments = inputs(input_ids, attention_mask)
    pattern = z_pattern(module, hidden_states, **arguments)
    output = module(hidden_states, output_activations=True, **arguments)
    activations = output.activations().double().cpu()
    batch_size, seq_len, n_ov = activations.shape
    groups = pattern.pattern.shape[1]
    W_O = module.W_O.detach().double().cpu()
    per_head = activations.view(batch_size, seq_len, groups, -1).permute(0, 2, 1, 3)  # [B, G, T, g]
    norms = W_O.norm(dim=-1).view(groups, -1)[None, :, None, :]

    def promotion(tokens: torch.Tensor) -> torch.Tensor:
        table = unembedding.standardized_matrix(W_O, tokens.reshape(-1))  # [H, B*T]
        table = table.view(groups, -1, batch_size, seq_len).permute(2, 0, 3, 1)
        return table * per_head.sign()

    return HeadReadings(pattern.pattern.double().cpu(), per_head.abs() * norms, promotion)


class _StopForward(Exception):
    pass


def _base_attention_call(model: PreTrainedModel, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """The attention input [B, T, d] and eager attention weights [B, H, T, S] of base-model layer `layer`."""
    attention = get_adapter(model).get_attention(model, layer)
    read: dict[str, torch.Tensor] = {}

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        read["x"] = args[0] if args else kwargs["hidden_states"]

    def post_hook(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        read["pattern"] = output[1]
        raise _StopForward

    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    handles = [attention.register_forward_pre_hook(pre_hook, with_kwargs=True),
               attention.register_forward_hook(post_hook, with_kwargs=True)]
    device = next(model.parameters()).device
    try:
        model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
        model.set_attn_implementation(previous)
    if read.get("pattern") is None:
        raise RuntimeError(f"The attention of layer {layer} returned no attention weights in eager mode.")
    return read["x"].detach().double().cpu(), read["pattern"].detach().double().cpu()


@torch.no_grad()
def base_readings(
    model: PreTrainedModel, layer: int, unembedding: Unembedding, input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> HeadReadings:
    """Readings of every head of the base model's attention at `layer` (groups of one head): its attention
    weights (eager attention) and its output, from the captured input and the head's V and O weights."""
    if layer in spliced_layers(model):
        raise ValueError(f"Layer {layer} of this model holds a Lorsa: unsplice it to read the base model's heads.")
    x, pattern = _base_attention_call(model, layer, input_ids, attention_mask)
    weights = get_adapter(model).attention_weights(model, layer)
    value = torch.einsum("bsd,kdh->bksh", x, weights.v.double())
    if weights.v_bias is not None:
        value = value + weights.v_bias.double()[None, :, None, :]
    value = value.repeat_interleave(weights.q.shape[0] // weights.v.shape[0], dim=1)  # [B, H, S, hd]
    written = torch.einsum("bhsk,hkd->bhsd", value, weights.o.double())  # each key's value through O
    output = pattern @ written  # [B, H, T, d]
    batch_size, heads, seq_len, d = output.shape

    def promotion(tokens: torch.Tensor) -> torch.Tensor:
        vectors = output.permute(0, 2, 1, 3).reshape(-1, d)
        scores = unembedding.standardized(vectors, tokens.reshape(-1).repeat_interleave(heads))
        return scores.view(batch_size, seq_len, heads).permute(0, 2, 1)[..., None]

    return HeadReadings(pattern, output.norm(dim=-1)[..., None], promotion)


__all__ = ["HeadReadings", "LayerInputs", "base_readings", "lorsa_readings"]
