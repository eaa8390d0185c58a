"""Every cache class transformers ships that can hold a Lorsa's keys and values gives cached generation equal to
recomputation, in every cache format; the others are refused by name (README, "Compatibility")."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, EncoderDecoderCache, StaticCache
from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

from lorsa_hf import unsplice
from lorsa_hf.cache_support import CacheNotSupportedError
from lorsa_hf.configuration_lorsa import CACHE_FORMATS
from tests.conftest import ARCHITECTURES, MISTRAL_WINDOW, VOCAB, make_base, make_lorsa

LAYERS = [0, 2]
QWEN2_SLIDING = dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)  # layer 2 slides, 0 does not


def spliced_model(arch: str, cache_format: str = "auto", attn_implementation: str = "sdpa", **overrides):
    model = make_base(arch, attn_implementation=attn_implementation, **overrides)
    lorsa = make_lorsa(model.config, LAYERS, cache_format=cache_format)
    return lorsa.splice(model), lorsa


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def assert_cached_generation_equals_recomputation(model, prompt: torch.Tensor, new_tokens: int = 10, **cache) -> None:
    """Greedy generation with `cache` (generate's keyword arguments) gives the tokens and, at fp32 tolerances,
    the logits of generation that recomputes every step without a cache."""
    settings = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True,
        output_logits=True,
    )
    with torch.no_grad():
        cached = model.generate(prompt, **settings, **cache)
        recomputed = model.generate(prompt, **settings, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits, 1), torch.stack(recomputed.logits, 1), rtol=0, atol=1e-4)


CACHE_KINDS = {
    "dynamic": lambda model: {},
    "DynamicCache(config)": lambda model: {"past_key_values": DynamicCache(config=model.config)},
    "static": lambda model: {"cache_implementation": "static"},
    "sliding_window": lambda model: {"cache_implementation": "sliding_window"},
    "StaticCache": lambda model: {"past_key_values": StaticCache(config=model.config, max_cache_len=32)},
    "static, chunked prefill": lambda model: {"cache_implementation": "static", "prefill_chunk_size": 3},
}

# ------------------------------------------------------------------------------------------ supported caches


@pytest.mark.parametrize("cache_format", CACHE_FORMATS)
@pytest.mark.parametrize("kind", CACHE_KINDS)
@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
def test_every_cache_kind_and_format_generates_as_recomputation(arch, kind, cache_format):
    model, _ = spliced_model(arch, cache_format)
    assert_cached_generation_equals_recomputation(model, tokens(1, 6), **CACHE_KINDS[kind](model))


@pytest.mark.parametrize("implementation", ["static", "sliding_window"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_static_cache_implementations_generate_as_recomputation_on_every_architecture(arch, implementation):
    model, _ = spliced_model(arch)
    assert_cached_generation_equals_recomputation(model, tokens(1, 6), cache_implementation=implementation)


@pytest.mark.parametrize("cache_format", CACHE_FORMATS)
@pytest.mark.parametrize("kind", ["static", "StaticCache", "static, chunked prefill"])
@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_static_sliding_layers_drop_keys_where_the_base_window_does(arch, kind, cache_format):
    """Mistral slides on every layer, Qwen2 here on layer 2 only, in a 5-token window: 14 steps after a 4-token
    prompt go far beyond it, through the static sliding layer's rolling buffer."""
    model, _ = spliced_model(arch, cache_format, **(QWEN2_SLIDING if arch == "qwen2" else {}))
    assert_cached_generation_equals_recomputation(model, tokens(1, 4), new_tokens=14, **CACHE_KINDS[kind](model))


@pytest.mark.parametrize("cache_format", ["values", "inputs"])
@pytest.mark.parametrize("arch", ["gpt_neox", "llama", "mistral"])
def test_beam_search_reorders_a_static_cache(arch, cache_format):
    model, _ = spliced_model(arch, cache_format)
    settings = dict(max_new_tokens=8, min_new_tokens=8, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.no_grad():
        cached = model.generate(tokens(1, 5), cache_implementation="static", **settings)
        recomputed = model.generate(tokens(1, 5), use_cache=False, **settings)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_left_padded_batch_with_a_static_cache_generates_as_with_a_dynamic_one(arch, attn_implementation):
    """The padding reaches the Lorsa in the mask over the static buffer (a boolean one with sdpa, an additive one
    with eager); the dynamic cache's padded generation equals each prompt alone (tests/test_splicing.py)."""
    model, _ = spliced_model(arch, attn_implementation=attn_implementation)
    input_ids = tokens(2, 7, seed=1)
    mask = torch.ones_like(input_ids)
    input_ids[0, :3], mask[0, :3] = model.config.pad_token_id, 0
    settings = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
                    output_logits=True)
    with torch.no_grad():
        static = model.generate(input_ids, cache_implementation="static", **settings)
        dynamic = model.generate(input_ids, **settings)
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.logits, 1), torch.stack(dynamic.logits, 1), rtol=0, atol=1e-4)


def test_a_static_cache_holds_the_lorsa_keys_in_buffers_preallocated_at_its_shapes():
    """Preallocated at the base model's key/value shapes (`early_initialization`, as generate does for chunked
    prefill), a static layer is reallocated at the Lorsa's on its first update; a sliding one is window-sized."""
    model, lorsa = spliced_model("qwen2", "values", **QWEN2_SLIDING)
    cache = StaticCache(config=model.config, max_cache_len=16)
    cache.early_initialization(1, model.config.num_key_value_heads, 16, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        model(tokens(1, 6), past_key_values=cache, use_cache=True)
    config = lorsa.config
    assert [type(cache.layers[layer]) for layer in LAYERS] == [StaticLayer, StaticSlidingWindowLayer]
    for layer, length in zip(LAYERS, (16, 5), strict=True):
        assert tuple(cache.layers[layer].keys.shape) == (1, config.n_qk_heads, length, config.d_qk_head)
        assert tuple(cache.layers[layer].values.shape) == (1, config.n_qk_heads, length, config.ov_group_size)
    assert int(cache.layers[0].get_seq_length()) == 6
    assert cache.layers[0].keys[:, :, 6:].abs().max() == 0  # the slots not yet written


# ------------------------------------------------------------------------------------------ refused by name


def test_a_quantized_cache_is_refused_by_name():
    model, _ = spliced_model("llama")
    refused = r"QuantizedCache \(layer 0: Fp8QuantizedLayer\) quantizes the keys and values"
    with pytest.raises(CacheNotSupportedError, match=refused):
        model.generate(
            tokens(1, 4), max_new_tokens=2, cache_implementation="quantized", cache_config={"backend": "fp8"}
        )


def test_an_encoder_decoder_cache_is_refused_by_name():
    model, _ = spliced_model("llama")
    cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
    with pytest.raises(CacheNotSupportedError, match="EncoderDecoderCache holds the self- and cross-attention"):
        model(tokens(1, 4), past_key_values=cache, use_cache=True)


def test_continuous_batching_is_refused_by_name_until_unsplice():
    """Refused before the batching thread starts, which would log the error and answer nothing."""
    model, _ = spliced_model("llama")
    with pytest.raises(CacheNotSupportedError, match=r"PagedAttentionCache \(continuous batching"):
        model.generate(tokens(1, 4), max_new_tokens=2, cache_implementation="paged")
    with pytest.raises(CacheNotSupportedError, match="PagedAttentionCache"):
        model.generate_batch([[5, 6, 7]])
    unsplice(model)
    assert "init_continuous_batching" not in vars(model)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_a_static_sliding_layer_at_another_window_is_refused(arch):
    """Mistral's layers slide in a window of 5: a cache made for a window of 3 would drop keys the mask still lets
    the Lorsa read; Llama's attend fully, and a sliding cache layer would drop keys they read."""
    model, _ = spliced_model(arch)
    other = copy.deepcopy(model.config)
    other.sliding_window = 3 if arch == "mistral" else MISTRAL_WINDOW
    cache = StaticCache(config=other, max_cache_len=32)
    with pytest.raises(CacheNotSupportedError, match=r"StaticSlidingWindowLayer\) drops keys at another window"):
        model(tokens(1, 8), past_key_values=cache, use_cache=True)
