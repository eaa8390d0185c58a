"""Splicing Lorsa layers into a base model in place of its attention modules, and taking them out again.

Below the model in the layering: it receives the Lorsa as anything with a `config` and a `layer(index)` (a
`LorsaForReplacement`), so `LorsaForReplacement.splice` / `unsplice` call it without an import circle.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import output_capturing

from .adapters import ArchitectureAdapter, get_adapter
from .configuration_lorsa import LorsaConfig
from .splice_record import update_record

WINDOW_IN_MASK = ("eager", "sdpa", "flex_attention")
"""Attention implementations whose mask carries a sliding window (flash attention takes it as an argument)."""


class SplicableLorsa(Protocol):
    """What splicing needs of a Lorsa: its config and the Lorsa layer replacing each of `config.layers`."""

    config: LorsaConfig

    def layer(self, index: int) -> nn.Module: ...


class LorsaSplicedAttention(nn.Module):
    """Stands in a base model's attention slot: called exactly like the module it replaced, it runs the Lorsa
    layer on the same input and returns `(output, None)`.

    Arguments are bound against the replaced module's own signature, so positional and keyword calls mean
    what they meant to the original (GPTNeoX passes the cache as `layer_past`, Llama as `past_key_values` or
    `cache` depending on the transformers release). The binding reads only the positional names, kept as a
    tuple, so that torch.compile traces the call (`inspect.Signature.bind` breaks a full graph). The replaced
    module is kept, unregistered, for `unsplice` and for saving (a state dict of the base model's own weights
    reloads into it, see `splice_record`).
    """

    is_lorsa_splice = True

    def __init__(
        self,
        lorsa_layer: nn.Module,
        original: nn.Module,
        adapter: ArchitectureAdapter,
        use_base_rotary: bool,
        lorsa_model: SplicableLorsa | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        self.lorsa = lorsa_layer
        self.layer_idx = lorsa_layer.layer_idx
        self.use_base_rotary = use_base_rotary
        self.sliding_window = sliding_window
        self._cache_arguments = adapter.cache_arguments
        self._positional_names = _positional_names(original.forward)
        object.__setattr__(self, "original_module", original)
        object.__setattr__(self, "lorsa_model", lorsa_model)
        self.register_load_state_dict_pre_hook(_load_base_weights)

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        if len(args) > len(self._positional_names):
            raise TypeError(
                f"{type(self.original_module).__name__}.forward takes {len(self._positional_names)} positional "
                f"arguments but {len(args)} were given."
            )
        positional = dict(zip(self._positional_names, args, strict=False))
        twice = positional.keys() & kwargs.keys()
        if twice:
            raise TypeError(
                f"{type(self.original_module).__name__}.forward got multiple values for {sorted(twice)}: pass each "
                "argument either by position or by name."
            )
        arguments = {**positional, **kwargs}
        cache = next((arguments[name] for name in self._cache_arguments if arguments.get(name) is not None), None)
        position_embeddings = arguments.get("position_embeddings") if self.use_base_rotary else None
        output = self.lorsa(
            arguments["hidden_states"],
            position_embeddings=position_embeddings,
            position_ids=arguments.get("position_ids"),
            attention_mask=arguments.get("attention_mask"),
            cache=cache,
            sliding_window=self.sliding_window,
        )
        _record_no_pattern()
        return output.hidden_states, None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}, replaces={type(self.original_module).__name__}"


def _positional_names(forward: Any) -> tuple[str, ...]:
    """The names a call to `forward` binds positional arguments to, in order."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(name for name, p in inspect.signature(forward).parameters.items() if p.kind in positional)


def _record_no_pattern() -> None:
    """With `output_attentions=True`, put None in this layer's place of the returned patterns (transformers
    collects them from the attention classes it knows, so without this every later layer's pattern would sit one
    place early). A Lorsa has no single pattern per base head to stand in for them."""
    collector = getattr(output_capturing, "_active_collector", None)
    collected = collector.get() if collector is not None else None
    if collected is not None and "attentions" in collected:
        collected["attentions"].append(None)


def base_model_of(model: Any) -> PreTrainedModel:
    """The transformers model inside a PEFT `PeftModel` (or `model` itself), whose attention slots are spliced."""
    if not isinstance(model, PreTrainedModel) and hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model


def _load_base_weights(
    module: LorsaSplicedAttention,
    state_dict: dict[str, torch.Tensor],
    prefix: str,
    local_metadata: Any,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    """Load a state dict saved from this spliced model (the base's own weights, see `splice_record`): the keys of
    the replaced attention module go into it; a trainable Lorsa whose weights the state dict lacks is refused,
    since it would silently keep the weights it has now."""
    original = module.original_module
    found = {name: state_dict.pop(prefix + name) for name in original.state_dict() if prefix + name in state_dict}
    if found:
        original.load_state_dict(found, strict=False)
    has_lorsa = any(key.startswith(prefix + "lorsa.") for key in state_dict)
    if found and not has_lorsa and any(p.requires_grad for p in module.lorsa.parameters()):
        error_msgs.append(
            f"The state dict has the base model's attention weights for {prefix.rstrip('.')} but none of the "
            "trainable Lorsa spliced there: a checkpoint of a spliced model keeps each Lorsa in its own subfolder "
            "(see config.lorsa_splice). Load it with lorsa_hf.load_spliced(folder), or freeze the Lorsa "
            "(requires_grad_(False)) to keep the one spliced now."
        )


def _first_floating_parameter(module: nn.Module) -> torch.Tensor | None:
    return next((p for p in module.parameters() if p.is_floating_point()), None)


def _rotary_matches(lorsa: SplicableLorsa, adapter: ArchitectureAdapter, base_config: Any) -> bool:
    """Whether the base model's `(cos, sin)` are exactly what the Lorsa's own rotary would compute."""
    config = lorsa.config
    base = adapter.describe(base_config)
    ours = {k: v for k, v in config.rope_parameters.items() if k != "partial_rotary_factor"}
    theirs = {k: v for k, v in base.rope_parameters.items() if k != "partial_rotary_factor"}
    return config.rotary_dim == base.rotary_dim and ours == theirs


def _check_compatible(lorsa: SplicableLorsa, model: PreTrainedModel, layers: list[int]) -> ArchitectureAdapter:
    config, base_config = lorsa.config, model.config
    adapter = get_adapter(model)
    if base_config.model_type != config.base_model_type:
        raise ValueError(
            f"Wrong base model: this Lorsa was trained for a {config.base_model_type!r} model "
            f"({config.base_model_name_or_path or 'name not recorded'}), got a {base_config.model_type!r} model."
        )
    if base_config.hidden_size != config.hidden_size:
        raise ValueError(
            f"Wrong base model: hidden size {base_config.hidden_size} does not match the Lorsa's "
            f"hidden_size {config.hidden_size} ({config.base_model_name_or_path or 'base model not recorded'})."
        )
    n_layers = len(adapter.decoder_layers(model))
    if base_config.num_hidden_layers != config.num_hidden_layers or n_layers != config.num_hidden_layers:
        raise ValueError(
            f"Wrong base model: it has {n_layers} layers but the Lorsa was trained for one with "
            f"{config.num_hidden_layers} ({config.base_model_name_or_path or 'base model not recorded'})."
        )
    implementation = getattr(base_config, "_attn_implementation", None) or "eager"
    for layer in layers:
        window = adapter.sliding_window(base_config, layer)
        if window is not None and implementation not in WINDOW_IN_MASK:
            raise ValueError(
                f"Layer {layer} of this {base_config.model_type} model attends within a sliding window of {window} "
                f"tokens, which {implementation!r} attention takes as an argument instead of in the attention mask "
                "a Lorsa reads; load the base model with attn_implementation='sdpa' (or 'eager', 'flex_attention')."
            )
        if layer not in config.layers:
            raise ValueError(f"Layer {layer} is not one this Lorsa replaces (it replaces {config.layers}).")
        if not 0 <= layer < n_layers:
            raise IndexError(f"Layer {layer} is out of range for a model with {n_layers} layers.")
        if isinstance(adapter.get_attention(model, layer), LorsaSplicedAttention):
            raise RuntimeError(
                f"Layer {layer} of this model already holds a Lorsa; unsplice it first (lorsa.unsplice(model))."
            )
    return adapter


def lorsa_attention_modules(
    lorsa: SplicableLorsa, model: PreTrainedModel, layers: list[int] | None = None, move: bool = False
) -> dict[int, LorsaSplicedAttention]:
    """The modules `splice` puts into `model`'s attention slots for `layers`, checked and built but not put in
    place (the eval suite runs them in the slots one run at a time). Every check runs before anything is built."""
    model = base_model_of(model)
    layers = list(lorsa.config.layers if layers is None else layers)
    adapter = _check_compatible(lorsa, model, layers)
    for layer in layers:
        original = _first_floating_parameter(adapter.get_attention(model, layer))
        ours = lorsa.layer(layer).W_Q
        if original is not None and original.device.type == "meta":
            raise ValueError(
                f"Layer {layer}'s attention is offloaded (its weights are on the meta device, as accelerate leaves "
                "modules a device_map puts on 'disk' or 'cpu' offload): splicing would move the Lorsa there and "
                "lose its weights. Load the base model with that layer on a real device."
            )
        if original is not None and (original.device, original.dtype) != (ours.device, ours.dtype) and not move:
            raise ValueError(
                f"Layer {layer}: the Lorsa is on {ours.device}/{ours.dtype} but the base model is on "
                f"{original.device}/{original.dtype}; move it (lorsa.to(...)) or pass move=True."
            )
    use_base_rotary = _rotary_matches(lorsa, adapter, model.config)
    modules = {}
    for layer in layers:
        original = adapter.get_attention(model, layer)
        lorsa_layer = lorsa.layer(layer)
        reference = _first_floating_parameter(original)
        if reference is not None:
            lorsa_layer.to(device=reference.device, dtype=reference.dtype)
        window = adapter.sliding_window(model.config, layer)
        modules[layer] = LorsaSplicedAttention(lorsa_layer, original, adapter, use_base_rotary, lorsa, window)
    return modules


def splice(
    lorsa: SplicableLorsa, model: PreTrainedModel, layers: list[int] | None = None, move: bool = False
) -> PreTrainedModel:
    """Replace the attention modules of `layers` of `model` with `lorsa`'s layers, in place; see
    `LorsaForReplacement.splice`. Every check runs before anything is replaced. A PEFT model is spliced inside."""
    base = base_model_of(model)
    adapter = get_adapter(base)
    for layer, module in lorsa_attention_modules(lorsa, base, layers, move).items():
        adapter.set_attention(base, layer, module)
    update_record(base)
    return model


def unsplice(model: PreTrainedModel, lorsa: SplicableLorsa | None = None) -> PreTrainedModel:
    """Put back the attention modules that a Lorsa replaced in `model` (only `lorsa`'s when given, else every
    spliced layer), moved to the device and dtype the model has now, and return `model`."""
    wrapper, model = model, base_model_of(model)
    adapter = get_adapter(model)
    spliced = []
    for index, layer in enumerate(adapter.decoder_layers(model)):
        module = getattr(layer, adapter.attention_attribute)
        if not isinstance(module, LorsaSplicedAttention):
            continue
        if lorsa is None or (index in lorsa.config.layers and module.lorsa is lorsa.layer(index)):
            spliced.append((index, module))
    if not spliced:
        raise ValueError("No Lorsa of this kind is spliced into this model; nothing to unsplice.")
    for index, module in spliced:
        reference = module.lorsa.W_Q
        adapter.set_attention(model, index, module.original_module.to(device=reference.device, dtype=reference.dtype))
    update_record(model)
    return wrapper


def spliced_layers(model: PreTrainedModel) -> list[int]:
    """Indices of the layers of `model` whose attention is currently a Lorsa."""
    model = base_model_of(model)
    adapter = get_adapter(model)
    return [
        index
        for index, layer in enumerate(adapter.decoder_layers(model))
        if isinstance(getattr(layer, adapter.attention_attribute), LorsaSplicedAttention)
    ]
