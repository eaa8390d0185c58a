"""Which transformers cache layers a Lorsa layer can use: those that keep every key and value it is given, at the
shapes it gives them, so that cached generation equals recomputation."""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer


class CacheNotSupportedError(TypeError):
    """A cache whose layers would silently change what a Lorsa layer attends over."""


def check_cache(cache: Any, layer_idx: int, sliding_window: int | None = None) -> None:
    """Refuse a cache whose layer `layer_idx` is not a plain `DynamicLayer`: static layers are preallocated at the
    base model's key/value shapes (a Lorsa caches other ones), sliding-window layers drop keys the Lorsa (full
    attention) still needs, quantized layers change the keys. A `DynamicSlidingWindowLayer` is accepted when its
    window is `sliding_window`, the one the attention mask carries (the Lorsa reads no older key)."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise CacheNotSupportedError(
            f"A Lorsa layer needs a transformers Cache (DynamicCache), got {type(cache).__name__}."
        )
    layer = layers[layer_idx] if layer_idx < len(layers) else None
    kind = type(layer) if layer is not None else getattr(cache, "layer_class_to_replicate", None)
    windowed = kind is DynamicSlidingWindowLayer and sliding_window is not None
    if windowed and getattr(layer, "sliding_window", None) == sliding_window:
        return
    if kind is not DynamicLayer:
        name = kind.__name__ if kind is not None else "no layer class"
        raise CacheNotSupportedError(
            f"{type(cache).__name__} (layer {layer_idx}: {name}) cannot hold a spliced Lorsa's cache: static layers "
            "are preallocated at the base model's key/value shapes, sliding-window layers drop keys the Lorsa "
            "attends over, quantized layers change them. Generate with the default dynamic cache "
            "(no cache_implementation, or past_key_values=DynamicCache())."
        )


__all__ = ["CacheNotSupportedError", "check_cache"]
