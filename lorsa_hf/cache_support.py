"""Which transformers caches a Lorsa layer can use, and how it writes to one.

A Lorsa layer caches other shapes than the attention module it replaces (keys of n_qk groups, and the head values
or the layer input), so it needs a cache layer that takes any shape: the dynamic layers (`DynamicLayer`,
`DynamicSlidingWindowLayer`) and the static ones (`StaticLayer`, `StaticSlidingWindowLayer`), whether or not the
cache offloads them. A static layer is preallocated and returns its whole buffer, so `update_cache` says where
its keys sit, and the Lorsa masks the slots not yet written. The others are refused by name: quantized layers
change the keys and values, an `EncoderDecoderCache` belongs to encoder-decoder models, and continuous batching's
paged cache is read by paged attention kernels a Lorsa does not run.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import (
    BaseQuantizedLayer,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    EncoderDecoderCache,
    StaticLayer,
    StaticSlidingWindowLayer,
)
from transformers.generation.continuous_batching.cache import PagedAttentionCache

USE_INSTEAD = (
    "Generate with the default dynamic cache (no cache_implementation, or past_key_values=DynamicCache()) or a "
    "static one (cache_implementation='static', or past_key_values=StaticCache(config, max_cache_len))."
)
SLIDING_LAYERS = (DynamicSlidingWindowLayer, StaticSlidingWindowLayer)
PAGED_REFUSAL = (
    "PagedAttentionCache (continuous batching: generate_batch, init_continuous_batching, "
    "cache_implementation='paged') stores keys in pages that paged attention kernels read; a Lorsa attends over "
    "its own keys and values with its own kernels."
)


class CacheNotSupportedError(TypeError):
    """A cache whose layers would silently change what a Lorsa layer attends over."""


def refuse_continuous_batching(*args: Any, **kwargs: Any) -> None:
    """Stands in a spliced model's `init_continuous_batching`, which every continuous batching entry point calls
    first: the paged cache would reach the Lorsa inside the batching thread, which logs the refusal and returns
    the requests unanswered instead of raising it."""
    raise CacheNotSupportedError(f"{PAGED_REFUSAL} {USE_INSTEAD}")


def _refusal(cache: Any, layer_idx: int, kind: type | None) -> str:
    """Why `cache` (its layer `layer_idx` of class `kind`) cannot hold a Lorsa's keys and values, by name."""
    name = type(cache).__name__
    if isinstance(cache, EncoderDecoderCache):
        return (
            f"{name} holds the self- and cross-attention caches of an encoder-decoder model; a Lorsa splices into "
            "decoder-only models, whose self-attention cache is a DynamicCache or StaticCache."
        )
    if isinstance(cache, PagedAttentionCache):
        return PAGED_REFUSAL
    if kind is None:
        return f"A Lorsa layer needs a transformers Cache, got {name}."
    if issubclass(kind, BaseQuantizedLayer):
        return (
            f"{name} (layer {layer_idx}: {kind.__name__}) quantizes the keys and values it holds, so cached "
            "generation would not equal recomputation."
        )
    if issubclass(kind, SLIDING_LAYERS):
        return (
            f"{name} (layer {layer_idx}: {kind.__name__}) drops keys at another window than the one this layer's "
            "attention mask carries, so the Lorsa would lose keys it attends over."
        )
    return f"{name} (layer {layer_idx}: {kind.__name__}) is not a key/value layer a Lorsa can write its cache to."


def _keeps_window(layer: StaticSlidingWindowLayer, sliding_window: int) -> bool:
    """Whether a static sliding layer drops keys where a window of `sliding_window` does. It keeps
    min(its window, max_cache_len) keys, and `is_croppable` says the second is the smaller: a buffer shorter than
    the window drops keys only once more tokens arrive than it was preallocated for, as the base model's own
    static sliding layer of that length does."""
    return layer.max_cache_len == sliding_window or (layer.max_cache_len < sliding_window and layer.is_croppable)


def check_cache(cache: Any, layer_idx: int, sliding_window: int | None = None) -> None:
    """Refuse, by name, a cache whose layer `layer_idx` is not one of `DynamicLayer` and `StaticLayer`, or a
    sliding one (`DynamicSlidingWindowLayer`, `StaticSlidingWindowLayer`) that keeps exactly the window
    `sliding_window` of this layer's attention mask (the Lorsa reads no older key; see `_keeps_window` for a
    static sliding layer preallocated for fewer tokens than the window)."""
    layers = getattr(cache, "layers", None)
    if layers is None or isinstance(cache, (EncoderDecoderCache, PagedAttentionCache)):
        raise CacheNotSupportedError(f"{_refusal(cache, layer_idx, None)} {USE_INSTEAD}")
    layer = layers[layer_idx] if layer_idx < len(layers) else None
    kind = type(layer) if layer is not None else getattr(cache, "layer_class_to_replicate", None)
    if kind in (DynamicLayer, StaticLayer):
        return
    if kind is DynamicSlidingWindowLayer and sliding_window is not None and layer.sliding_window == sliding_window:
        return
    if kind is StaticSlidingWindowLayer and sliding_window is not None and _keeps_window(layer, sliding_window):
        return
    raise CacheNotSupportedError(f"{_refusal(cache, layer_idx, kind)} {USE_INSTEAD}")


def _fit_preallocated(layer: StaticLayer, key: torch.Tensor, value: torch.Tensor) -> None:
    """Reallocate a static layer that `Cache.early_initialization` preallocated at the base model's key/value
    shapes (as `generate` does for chunked prefill) at the Lorsa's. Such a layer holds nothing yet: a layer the
    Lorsa wrote to was allocated at its own shapes on its first update."""
    if not layer.is_initialized:
        return
    shapes = (layer.keys.shape[1], layer.keys.shape[-1], layer.values.shape[1], layer.values.shape[-1])
    if shapes != (key.shape[1], key.shape[-1], value.shape[1], value.shape[-1]):
        layer.lazy_initialization(key, value)


def update_cache(
    cache: Any, layer_idx: int, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int | torch.Tensor, int] | None]:
    """Write the new keys [B, n_qk, T, d_qk] and cache values [B, H, T, w] of layer `layer_idx` into `cache`;
    return every key and value the layer holds now, and where they sit.

    A dynamic layer returns the keys of earlier tokens then the new ones, which the attention mask describes as
    it is: the positions are None. A static layer returns its preallocated buffer (with
    `StaticSlidingWindowLayer`, the last keys once it is full); the positions are then (the first query's,
    the first key's): queries after the `past` tokens written before, keys from 0 in a buffer not yet full,
    so that the caller masks the slots not yet written (`lorsa_hf.ops.masks.mask_over_buffer`)."""
    layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
    if not isinstance(layer, StaticLayer):
        key, value = cache.update(key, value, layer_idx)
        return key, value, None
    _fit_preallocated(layer, key, value)
    past = layer.get_seq_length()  # a 0-dim tensor the update advances in place, or a Python int (sliding)
    past = past.clone() if isinstance(past, torch.Tensor) else past
    query_length = key.shape[-2]
    key, value = cache.update(key, value, layer_idx)
    key_start = max(past + query_length - key.shape[-2], 0) if isinstance(layer, StaticSlidingWindowLayer) else 0
    return key, value, (past, key_start)


__all__ = ["CacheNotSupportedError", "check_cache", "refuse_continuous_batching", "update_cache"]
