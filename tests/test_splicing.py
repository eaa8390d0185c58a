"""A spliced model still works everywhere a transformers model does, and splicing is reversible and checked."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import lorsa_hf
from lorsa_hf import LorsaForReplacement, load_spliced, spliced_layers, unsplice
from lorsa_hf.cache_support import CacheNotSupportedError
from lorsa_hf.splicing import LorsaSplicedAttention
from tests.conftest import VOCAB, make_base, make_lorsa

LAYERS = [0, 2]


def spliced_model(arch, dtype=torch.float32, attn_implementation="sdpa", activation="topk_abs"):
    model = make_base(arch, dtype=dtype, attn_implementation=attn_implementation)
    lorsa = make_lorsa(model.config, LAYERS, dtype=dtype, activation=activation)
    return lorsa.splice(model), lorsa


def tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_splice_replaces_exactly_the_chosen_layers(arch):
    model, lorsa = spliced_model(arch)
    assert spliced_layers(model) == LAYERS
    module = lorsa_hf.adapters.get_adapter(model).get_attention(model, 0)
    assert isinstance(module, LorsaSplicedAttention) and module.lorsa is lorsa.layer(0)
    names = ("W_Q", "b_Q", "W_K", "b_K", "W_V", "b_V", "W_O", "b_O")
    names += ("q_norm_weight", "k_norm_weight") if lorsa.config.use_qk_norm else ()  # Qwen3's default
    assert {name for name, _ in model.named_parameters() if ".lorsa." in name} == {
        f"{prefix}.lorsa.{p}" for prefix in _attention_prefixes(model) for p in names
    }


def test_a_spliced_attention_refuses_calls_the_replaced_module_would_refuse(arch):
    model, _ = spliced_model(arch)
    module = lorsa_hf.adapters.get_adapter(model).get_attention(model, 0)
    hidden = torch.zeros(1, 4, model.config.hidden_size)
    first = module._positional_names[0]
    with pytest.raises(TypeError, match=rf"multiple values for \['{first}'\]"):
        module(hidden, **{first: hidden})
    with pytest.raises(TypeError, match="positional arguments but"):
        module(*([hidden] * (len(module._positional_names) + 1)))


def _attention_prefixes(model):
    adapter = lorsa_hf.adapters.get_adapter(model)
    names = {module: name for name, module in model.named_modules()}
    return [names[adapter.get_attention(model, layer)] for layer in LAYERS]


@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
def test_greedy_generate_with_cache_equals_recomputing_every_step(arch, activation):
    model, _ = spliced_model(arch, activation=activation)
    prompt = tokens(1, 6)
    with torch.no_grad():
        cached = model.generate(
            prompt, max_new_tokens=10, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        recomputed = model.generate(
            prompt, max_new_tokens=10, do_sample=False, use_cache=False, return_dict_in_generate=True,
            output_logits=True,
        )
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step_cached, step_recomputed in zip(cached.logits, recomputed.logits, strict=True):
        torch.testing.assert_close(step_cached, step_recomputed, rtol=0, atol=1e-4)
    # and each cached step equals a full forward of the sequence so far
    with torch.no_grad():
        full = model(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
    torch.testing.assert_close(torch.stack(cached.logits, 1), full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("cache_format", ["inputs", "values"])
def test_sliding_window_generation_beyond_the_window_equals_recomputing(cache_format):
    """Mistral's window is 5 tokens: 14 cached steps go far beyond it, and still match recomputation, which
    sees the window only in the mask. The window matters: without it the same weights give other logits."""
    model, lorsa = spliced_model("mistral")
    lorsa.config.cache_format = cache_format
    prompt = tokens(1, 4)
    with torch.no_grad():
        cached = model.generate(
            prompt, max_new_tokens=14, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        full = model(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
        torch.testing.assert_close(torch.stack(cached.logits, 1), full, rtol=0, atol=1e-4)
        model.config.sliding_window = None
        unwindowed = model(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
    assert (unwindowed - full)[:, 4:].abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_sliding_layers_bound_only_the_lorsas_spliced_there(arch):
    """Qwen2/Qwen3 with `use_sliding_window` slide from `max_window_layers` on: layer 0 keeps full attention,
    layer 2 reads a 5-token window. Cached generation far beyond the window equals recomputation, and turning
    the window off changes the logits, so the sliding Lorsa does honour it."""
    overrides = dict(use_sliding_window=True, sliding_window=5, max_window_layers=2)
    model = make_base(arch, **overrides)
    assert model.config.layer_types == ["full_attention", "full_attention", "sliding_attention"]
    adapter = lorsa_hf.adapters.get_adapter(model)
    assert [adapter.sliding_window(model.config, layer) for layer in LAYERS] == [None, 5]
    lorsa = make_lorsa(model.config, LAYERS)
    lorsa.splice(model)
    prompt = tokens(1, 4)
    with torch.no_grad():
        cached = model.generate(
            prompt, max_new_tokens=14, do_sample=False, return_dict_in_generate=True, output_logits=True
        )
        full = model(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
        torch.testing.assert_close(torch.stack(cached.logits, 1), full, rtol=0, atol=1e-4)
        model.config.layer_types = ["full_attention"] * 3
        unwindowed = model(cached.sequences[:, :-1]).logits[:, prompt.shape[1] - 1 :]
    assert (unwindowed - full)[:, 4:].abs().max() > 1e-2


def test_a_sliding_cache_layer_must_drop_keys_at_the_base_window_only():
    """Mistral's own sliding cache (window 5) serves the Lorsa; one with a narrower window would drop keys the
    mask still lets it read, and is refused."""
    model, _ = spliced_model("mistral")
    narrow = copy.deepcopy(model.config)
    narrow.sliding_window = 3
    with torch.no_grad():
        model(tokens(1, 8), past_key_values=DynamicCache(config=model.config), use_cache=True)
        with pytest.raises(CacheNotSupportedError, match="DynamicSlidingWindowLayer"):
            model(tokens(1, 8), past_key_values=DynamicCache(config=narrow), use_cache=True)


def test_refuses_a_sliding_window_the_attention_mask_does_not_carry():
    model = make_base("mistral")
    lorsa = make_lorsa(model.config, LAYERS)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sliding window of 5 tokens.*attn_implementation='sdpa'"):
        lorsa.splice(model)
    assert spliced_layers(model) == []


def test_cache_holds_the_lorsa_keys_and_grouped_values(arch):
    model, lorsa = spliced_model(arch)
    # the default, "auto", caches the smaller layer input here (tests/ops/test_cached_inputs.py)
    lorsa.config.cache_format = "values"
    with torch.no_grad():
        out = model(tokens(2, 5), use_cache=True)
    cache = out.past_key_values if "past_key_values" in out else out.cache
    config = lorsa.config
    window = lorsa_hf.adapters.get_adapter(model).sliding_window(model.config, LAYERS[0])
    kept = 5 if window is None else min(5, window - 1)  # a sliding cache layer keeps the last window - 1 tokens
    for layer in LAYERS:
        assert tuple(cache.layers[layer].keys.shape) == (2, config.n_qk_heads, kept, config.d_qk_head)
        assert tuple(cache.layers[layer].values.shape) == (2, config.n_qk_heads, kept, config.ov_group_size)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_gives_each_sequence_its_own_logits(arch, side):
    model, _ = spliced_model(arch)
    lengths = [5, 9]
    width = max(lengths)
    sequences = [tokens(1, n, seed=n)[0] for n in lengths]
    input_ids = torch.full((2, width), model.config.pad_token_id)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, span], mask[row, span] = seq, 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = model(input_ids, attention_mask=mask, position_ids=position_ids).logits
        for row, seq in enumerate(sequences):
            alone = model(seq[None]).logits[0]
            torch.testing.assert_close(batched[row][mask[row].bool()], alone, rtol=0, atol=1e-4)


def test_generate_on_a_left_padded_batch_matches_each_prompt_alone(arch):
    model, _ = spliced_model(arch)
    prompts = [tokens(1, 4, seed=1)[0], tokens(1, 7, seed=2)[0]]
    input_ids = torch.full((2, 7), model.config.pad_token_id)
    mask = torch.zeros(2, 7, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, 7 - len(prompt) :], mask[row, 7 - len(prompt) :] = prompt, 1
    with torch.no_grad():
        batched = model.generate(input_ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], max_new_tokens=6, do_sample=False)[0, len(prompt) :]
            assert torch.equal(batched[row, 7 : 7 + len(alone)], alone)  # alone stops early at EOS


def test_eager_and_sdpa_give_the_same_spliced_logits(arch):
    input_ids = tokens(2, 11)
    mask = torch.ones_like(input_ids)
    mask[0, :3] = 0
    logits = {}
    for implementation in ("eager", "sdpa"):
        model, _ = spliced_model(arch, attn_implementation=implementation)
        assert model.config._attn_implementation == implementation
        with torch.no_grad():
            logits[implementation] = model(input_ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(logits["eager"], logits["sdpa"], rtol=0, atol=1e-5)


def test_unsplice_restores_bit_identical_logits(arch):
    model = make_base(arch)
    input_ids = tokens(2, 8)
    with torch.no_grad():
        clean = model(input_ids).logits
    lorsa = make_lorsa(model.config, LAYERS)
    lorsa.splice(model)
    with torch.no_grad():
        assert not torch.allclose(model(input_ids).logits, clean)
    lorsa.unsplice(model)
    assert spliced_layers(model) == []
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, clean)


def test_unsplice_follows_the_model_to_a_new_dtype():
    model = make_base("llama")
    clean = make_base("llama").double()
    lorsa = make_lorsa(model.config, LAYERS)
    lorsa.splice(model)
    model.double()
    unsplice(model)
    input_ids = tokens(1, 6)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, clean(input_ids).logits)


def test_spliced_model_trains_the_lorsa_and_only_the_lorsa_gets_gradients(arch):
    model, lorsa = spliced_model(arch)
    model.requires_grad_(False)
    lorsa.requires_grad_(True)
    loss = model(tokens(2, 8), labels=tokens(2, 8)).loss
    loss.backward()
    assert all(p.grad is not None for p in lorsa.parameters())


def test_refuses_a_model_of_another_architecture():
    lorsa = make_lorsa(make_base("llama").config, LAYERS)
    with pytest.raises(ValueError, match="trained for a 'llama' model"):
        lorsa.splice(make_base("gpt_neox"))


def test_refuses_an_unsupported_architecture_and_names_the_supported_ones():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=VOCAB))
    lorsa = make_lorsa(make_base("llama").config, LAYERS)
    supported = "gpt_neox, llama, mistral, qwen2, qwen3"
    with pytest.raises(ValueError, match=f"Unsupported base architecture 'gpt2'.*{supported}"):
        lorsa.splice(gpt2)


def test_refuses_a_hidden_size_or_layer_count_that_does_not_match(arch):
    lorsa = make_lorsa(make_base(arch).config, LAYERS)
    with pytest.raises(ValueError, match="hidden size 32 does not match"):
        lorsa.splice(make_base(arch, hidden_size=32, intermediate_size=64))
    with pytest.raises(ValueError, match="has 4 layers but the Lorsa was trained for one with 3"):
        lorsa.splice(make_base(arch, num_hidden_layers=4))


def test_refuses_a_layer_it_does_not_replace():
    model = make_base("llama")
    lorsa = make_lorsa(model.config, LAYERS)
    with pytest.raises(ValueError, match="Layer 1 is not one this Lorsa replaces"):
        lorsa.splice(model, layers=[1])
    assert spliced_layers(model) == []


def test_refuses_splicing_the_same_model_twice():
    model = make_base("llama")
    lorsa = make_lorsa(model.config, LAYERS)
    lorsa.splice(model)
    with pytest.raises(RuntimeError, match="already holds a Lorsa"):
        lorsa.splice(model)
    with pytest.raises(RuntimeError, match="already holds a Lorsa"):
        make_lorsa(model.config, [2]).splice(model)


def test_refuses_another_dtype_unless_asked_to_move():
    model = make_base("gpt_neox", dtype=torch.float64)
    lorsa = make_lorsa(model.config, LAYERS)
    with pytest.raises(ValueError, match="torch.float32 but the base model is on cpu/torch.float64.*move=True"):
        lorsa.splice(model)
    assert spliced_layers(model) == []
    lorsa.splice(model, move=True)
    assert lorsa.layer(0).W_Q.dtype == torch.float64


def test_unsplice_of_a_model_without_lorsa_is_an_error():
    model = make_base("llama")
    with pytest.raises(ValueError, match="nothing to unsplice"):
        unsplice(model)


def test_splices_into_the_bare_base_model_class(arch):
    causal_lm = make_base(arch)
    bare = getattr(causal_lm, causal_lm.base_model_prefix)
    lorsa = make_lorsa(causal_lm.config, LAYERS)
    lorsa.splice(bare)
    assert spliced_layers(bare) == LAYERS
    with torch.no_grad():
        bare(tokens(1, 5))


def test_load_spliced_from_folders_with_subfolder(tmp_path, arch):
    model = make_base(arch)
    lorsa = make_lorsa(model.config, LAYERS)
    model.save_pretrained(tmp_path / "base")
    lorsa.save_pretrained(tmp_path / "lorsas" / "attn")
    input_ids = tokens(2, 7)
    loaded = load_spliced(tmp_path / "base", tmp_path / "lorsas", lorsa_subfolder="attn", dtype=torch.float64)
    assert loaded.dtype == torch.float64 and spliced_layers(loaded) == LAYERS
    expected = lorsa.double().splice(model.double())
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, expected(input_ids).logits, rtol=0, atol=1e-12)
    only_first = load_spliced(tmp_path / "base", tmp_path / "lorsas" / "attn", layers=[0])
    assert spliced_layers(only_first) == [0]
    with pytest.raises(ValueError, match=r"replaces layers \[0, 2\], not \[1\]"):
        load_spliced(tmp_path / "base", tmp_path / "lorsas" / "attn", layers=[1])


def test_load_spliced_resolves_hub_repo_ids_subfolders_and_revisions_from_the_cache(tmp_path):
    """Hub ids go through huggingface_hub: a repo already in the local cache loads offline by id and commit."""
    model = make_base("llama")
    lorsa = make_lorsa(model.config, LAYERS)
    commit = "0123456789abcdef0123456789abcdef01234567"
    for repo, save in (("org--tiny-llama", model.save_pretrained), ("org--tiny-lorsa", None)):
        snapshot = tmp_path / f"models--{repo}" / "snapshots" / commit
        (tmp_path / f"models--{repo}" / "refs").mkdir(parents=True)
        (tmp_path / f"models--{repo}" / "refs" / "main").write_text(commit)
        if save is not None:
            save(snapshot)
        else:
            lorsa.save_pretrained(snapshot / "layers-0-2")
    loaded = load_spliced(
        "org/tiny-llama", "org/tiny-lorsa", lorsa_subfolder="layers-0-2", lorsa_revision=commit, cache_dir=tmp_path
    )
    assert spliced_layers(loaded) == LAYERS
    input_ids = tokens(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids).logits, lorsa.splice(model)(input_ids).logits, rtol=0, atol=0)


def test_load_spliced_accepts_loaded_objects():
    model = make_base("llama")
    lorsa = make_lorsa(model.config, LAYERS)
    assert load_spliced(model, lorsa) is model
    assert isinstance(lorsa, LorsaForReplacement) and spliced_layers(model) == LAYERS
