"""A cache of the layer input keeps generation exact, holds x and the keys, and its decode step does no dense
n_ov x d work beyond the V projection."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from lorsa_hf import LorsaConfig
from tests.conftest import VOCAB, make_base, make_lorsa
from tests.ops.conftest import LAYER


def _step_flops(lorsa, cache_format: str, context: int) -> tuple[int, DynamicCache]:
    layer = lorsa.layer(LAYER)
    lorsa.config.cache_format = cache_format
    cache = DynamicCache()
    with torch.no_grad():
        layer(torch.randn(1, context, 64), cache=cache)
        with FlopCounterMode(display=False) as counter:
            layer(torch.randn(1, 1, 64), cache=cache)
    return counter.get_total_flops(), cache


@pytest.mark.parametrize("implementation", ["sparse", "dense"])
def test_decode_step_does_no_dense_n_ov_by_d_work_beyond_the_v_projection(implementation):
    n_ov, d, n_qk, d_qk, context = 1024, 64, 4, 16, 40
    lorsa = make_lorsa(make_base("llama").config, [LAYER], n_ov_heads=n_ov, top_k=8, d_qk_head=d_qk)
    lorsa.config.implementation = implementation
    flops, cache = _step_flops(lorsa, "inputs", context)
    length = context + 1
    floor = 2 * (2 * d * n_qk * d_qk + d * n_ov + n_qk * length * (d_qk + d))  # projections + attention over x
    if implementation == "sparse":
        assert flops <= floor
    else:
        assert flops >= floor + 2 * n_ov * d  # the dense decode: what the sparse path leaves out
    keys, inputs = cache.layers[LAYER].keys, cache.layers[LAYER].values
    assert keys.shape[1] * keys.shape[-1] + inputs.shape[1] * inputs.shape[-1] == n_qk * d_qk + d


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def spliced(arch: str, cache_format: str, implementation: str = "sparse"):
    model = make_base(arch)
    lorsa = make_lorsa(model.config, [0, 2], cache_format=cache_format, implementation=implementation)
    return lorsa.splice(model), lorsa


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("implementation", ["sparse", "dense"])
def test_generate_with_an_input_cache_equals_recomputing_and_the_value_cache(arch, implementation):
    model, lorsa = spliced(arch, "inputs", implementation)
    prompts = [tokens(1, 4, seed=1)[0], tokens(1, 7, seed=2)[0]]
    input_ids = torch.full((2, 7), model.config.pad_token_id)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, 7 - len(prompt) :], mask[row, 7 - len(prompt) :] = prompt, 1
    kwargs = dict(
        attention_mask=mask, max_new_tokens=8, do_sample=False, return_dict_in_generate=True, output_logits=True
    )
    with torch.no_grad():
        cached = model.generate(input_ids, use_cache=True, **kwargs)
        recomputed = model.generate(input_ids, use_cache=False, **kwargs)
        lorsa.config.cache_format = "values"
        values = model.generate(input_ids, use_cache=True, **kwargs)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.sequences, values.sequences)
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits, strict=True):
        torch.testing.assert_close(step_cached, step_recomputed, rtol=0, atol=1e-4)


def test_input_cache_holds_x_and_keys_and_auto_picks_the_smaller():
    model, lorsa = spliced("llama", "auto")
    assert lorsa.config.cached_inputs  # n_ov 128 > d 64
    with torch.no_grad():
        cache = model(tokens(2, 5), use_cache=True).past_key_values
    config = lorsa.config
    for layer in (0, 2):
        assert tuple(cache.layers[layer].keys.shape) == (2, config.n_qk_heads, 5, config.d_qk_head)
        assert tuple(cache.layers[layer].values.shape) == (2, config.n_qk_heads, 5, 64 // config.n_qk_heads)
    assert not LorsaConfig(hidden_size=64, n_ov_heads=64, n_qk_heads=4, top_k=4, cache_format="auto").cached_inputs


def test_input_cache_when_n_qk_does_not_divide_d():
    """n_qk 3 does not divide d 64: x is cached as one [B, 1, T, d] row; cached steps still equal a full pass."""
    lorsa = make_lorsa(make_base("llama").config, [LAYER], n_ov_heads=96, n_qk_heads=3, top_k=8, cache_format="inputs")
    layer = lorsa.layer(LAYER)
    x = torch.randn(2, 9, 64)
    cache = DynamicCache()
    with torch.no_grad():
        full = layer(x).hidden_states
        steps = [layer(x[:, :5], cache=cache).hidden_states]
        steps += [layer(x[:, t : t + 1], cache=cache).hidden_states for t in range(5, 9)]
    assert tuple(cache.layers[LAYER].values.shape) == (2, 1, 9, 64)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
