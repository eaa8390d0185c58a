"""The fast (sparse) Lorsa path equals the dense reference path, does no work proportional to n_ov x d beyond
the V projection where the math does not need it, and the input cache keeps generation exact."""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from lorsa_hf import LorsaConfig
from lorsa_hf._sparse import (
    ValueProjection,
    as_values,
    dense_attention_top_k,
    project_queries_keys_values,
    reference_projections,
    sparse_attention_top_k,
    sparse_decode,
)
from tests.conftest import VOCAB, make_base, make_lorsa

LAYER = 1
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def lorsa_pair(activation: str, ties: bool = False, device: str = "cpu", **overrides):
    """A sparse and a dense copy of the same random Lorsa (tiny Llama base, d 64, n_qk 4, n_ov 128)."""
    values = dict(n_ov_heads=128, top_k=8, activation=activation)
    values.update(overrides)
    sparse = make_lorsa(make_base("llama").config, [LAYER], **values)
    if ties:  # heads 2j and 2j + 1 identical: equal z, equal decoder norms, so every score is tied in pairs
        with torch.no_grad():
            layer = sparse.layer(LAYER)
            for name in ("W_V", "W_O", "b_V"):
                getattr(layer, name)[1::2] = getattr(layer, name)[0::2]
    dense = copy.deepcopy(sparse)
    dense.config.implementation = "dense"
    return sparse.to(device), dense.to(device)


def run_with_gradients(lorsa, x: torch.Tensor, grad: torch.Tensor, top_k: int | None = None):
    """Forward with activations, a loss on the output and on the kept activations, and every gradient: of each
    parameter and of the input (as attribution through a spliced model needs)."""
    lorsa.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = lorsa(x, top_k=top_k)
    loss = (out.hidden_states * grad).sum() + 0.1 * out.top_k_values.abs().sum()
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in lorsa.named_parameters()}
    gradients["input"] = x.grad
    return out, gradients


def assert_same_path_results(sparse, dense, x, top_k=None, atol=1e-5, rtol=1e-4):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.device)
    out_s, grads_s = run_with_gradients(sparse, x, grad, top_k)
    out_d, grads_d = run_with_gradients(dense, x, grad, top_k)
    torch.testing.assert_close(out_s.z, out_d.z, atol=atol, rtol=rtol)
    heads_s, order_s = out_s.top_k_indices.sort(-1)
    heads_d, order_d = out_d.top_k_indices.sort(-1)
    assert torch.equal(heads_s, heads_d)  # the same heads selected for every token
    values_s, values_d = out_s.top_k_values.gather(-1, order_s), out_d.top_k_values.gather(-1, order_d)
    torch.testing.assert_close(values_s, values_d, atol=atol, rtol=rtol)
    torch.testing.assert_close(out_s.activations(), out_d.activations(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out_s.hidden_states, out_d.hidden_states, atol=atol, rtol=rtol)
    assert grads_s.keys() == grads_d.keys()
    for name in grads_s:  # float32 rounding differs between the two decodes: tolerance scaled by the gradient
        scale = grads_d[name].abs().max().item()
        message = f"gradient of {name}"
        torch.testing.assert_close(grads_s[name], grads_d[name], atol=atol * scale, rtol=rtol, msg=message)
    return out_s, grads_s


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
@pytest.mark.parametrize("case", ["plain", "ties", "k_equals_n_ov"])
def test_sparse_equals_dense_outputs_activations_and_every_gradient(monkeypatch, activation, case, backward_from):
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    sparse, dense = lorsa_pair(activation, ties=case == "ties")
    x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    top_k = 128 if case == "k_equals_n_ov" else None
    out, grads = assert_same_path_results(sparse, dense, x, top_k=top_k)
    if case == "ties":
        scores = out.z.abs() if activation == "topk_abs" else out.z.relu()
        assert torch.equal(scores[..., 0::2], scores[..., 1::2])  # the selection really had to break ties
    if case == "k_equals_n_ov":
        assert out.top_k_indices.sort(-1).values.equal(torch.arange(128).expand(2, 12, 128))


@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
def test_gradient_reaches_w_o_only_in_selected_rows(activation):
    sparse, _ = lorsa_pair(activation, top_k=4)
    x = torch.randn(1, 3, 64)
    out, grads = run_with_gradients(sparse, x, torch.randn(1, 3, 64))
    selected = torch.zeros(128, dtype=torch.bool)
    selected[out.top_k_indices.flatten()] = True
    assert grads["layers.1.W_O"][~selected].abs().max() == 0
    assert grads["layers.1.W_O"][selected].abs().sum(-1).min() > 0


def test_decoder_norms_kept_for_inference_follow_in_place_updates():
    sparse, dense = lorsa_pair("topk_abs")
    x = torch.randn(2, 12, 64)
    with torch.no_grad():
        sparse(x)  # keeps the decoder norms on W_O
        for lorsa in (sparse, dense):
            lorsa.layer(LAYER).W_O[::3].mul_(5.0)  # as an optimizer step would: in place, version bumped
        selected_sparse, selected_dense = sparse(x).top_k_indices, dense(x).top_k_indices
    assert torch.equal(selected_sparse.sort(-1).values, selected_dense.sort(-1).values)


def _attend_and_select(
    attend, query, key, value, mask, W_O, uses: str, top_k: int = 5, activation: str = "topk_abs", inputs=None
):
    """z, the kept activations scattered into [N, n_ov], and the gradients of `inputs` (default q, k, v) for a
    loss on the kept activations (as in training) or on both them and z (as the auxiliary dead-head loss adds)."""
    z, values, indices = attend(query, key, value, mask, 0.3, W_O, top_k, activation)
    activations = torch.zeros_like(z).scatter(-1, indices, values)
    weights = torch.linspace(-1, 1, z.numel(), dtype=z.dtype).view_as(z)
    loss = (activations * weights.flip(-1)).sum()
    if uses == "z_and_values":
        loss = loss + (z * weights).sum()
    return (z, activations, *torch.autograd.grad(loss, inputs or (query, key, value)))


@pytest.mark.parametrize("uses", ["values", "z_and_values"])
@pytest.mark.parametrize("mask_form", ["none", "padding_2d", "additive_4d"])
def test_fused_chunked_attention_equals_the_reference(mask_form, uses):
    """Long keys (S > 2 g) and two d_qk-wide value chunks: the fused kernel path, with every mask form."""
    generator = torch.Generator().manual_seed(0)
    query, key = (torch.randn(2, 3, 40, 8, generator=generator, requires_grad=True) for _ in range(2))
    value = torch.randn(2, 3, 40, 16, generator=generator, requires_grad=True)
    W_O = torch.randn(48, 8, generator=generator)
    padding = torch.ones(2, 40, dtype=torch.long)
    padding[0, :7] = 0  # left padding: the first query rows of sequence 0 see no key at all
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    mask = {
        "none": None,
        "padding_2d": padding,
        "additive_4d": torch.zeros(2, 1, 40, 40).masked_fill(~(causal & padding.bool()[:, None, None, :]), -1e30),
    }[mask_form]
    results = [
        _attend_and_select(attend, query, key, value, mask, W_O, uses)
        for attend in (sparse_attention_top_k, dense_attention_top_k)
    ]
    for fused, reference in zip(*results, strict=True):
        torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-4)


def _attention_masks(batch: int, query_length: int, key_length: int) -> dict[str, object]:
    """Every mask form transformers hands an attention module, for queries at the last T of S positions; the first
    sequence is left-padded so that its first query rows see no key at all."""
    padding = torch.ones(batch, key_length, dtype=torch.long)
    padding[0, : key_length - query_length + 3] = 0
    causal = torch.ones(query_length, key_length, dtype=torch.bool).tril(key_length - query_length)
    allowed = causal & padding.bool()[:, None, None, :]
    masks = {
        "padding_2d": padding,
        "additive_4d": torch.zeros(batch, 1, query_length, key_length).masked_fill(~allowed, -1e30),
        "boolean_4d": allowed,
        "bidirectional": torch.ones(batch, 1, query_length, key_length, dtype=torch.bool),
    }
    if query_length == key_length:  # no mask means plain causal attention
        masks["none"] = None
    return masks


@pytest.mark.parametrize(
    ("lengths", "mask_form"),
    [((23, 23), form) for form in ("none", "padding_2d", "additive_4d", "boolean_4d", "bidirectional")]
    + [((9, 23), form) for form in ("padding_2d", "additive_4d", "boolean_4d", "bidirectional")],
)
@pytest.mark.parametrize("uses", ["values", "z_and_values"])
def test_blocked_attention_and_selection_equal_the_reference(monkeypatch, lengths, mask_form, uses):
    """Blocks of 4 query rows, each against the keys its mask lets it see, with the TopK in the same node and a
    backward over one or two heads at a time: z, the kept activations and the gradients of q, k and v equal the
    reference's in float64, for every mask form, with a cached prefix and padded rows, whether the loss reads the
    kept activations only or z too."""
    monkeypatch.setattr("lorsa_hf._sparse.ATTENTION_BLOCK_ROWS", 4)
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_CHUNK_ELEMENTS", 4 * 24)  # backward: one or two heads at a time
    query_length, key_length = lengths
    masks = _attention_masks(2, query_length, key_length)
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, query_length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    key = torch.randn(2, 3, key_length, 8, generator=generator, dtype=torch.float64, requires_grad=True)
    value = torch.randn(2, 3, key_length, 24, generator=generator, dtype=torch.float64, requires_grad=True)
    W_O = torch.randn(72, 16, generator=generator, dtype=torch.float64)
    results = [
        _attend_and_select(attend, query, key, value, masks[mask_form], W_O, uses)
        for attend in (sparse_attention_top_k, dense_attention_top_k)
    ]
    for blocked, reference in zip(*results, strict=True):
        torch.testing.assert_close(blocked, reference, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mask_form", ["none", "padding_2d", "additive_4d", "boolean_4d", "bidirectional"])
@pytest.mark.parametrize("uses", ["values", "z_and_values"])
@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
@pytest.mark.parametrize("backward_from", ["inputs", "values"])
def test_attention_over_projected_values_equals_the_reference(monkeypatch, mask_form, uses, activation, backward_from):
    """v handed over as the `ValueProjection` that computes it: the node projects v itself and its backward reaches
    x, W_V and b_V either through v or through x (softmax rows sum to one). z, the kept activations and the
    gradients of q, k, x, W_V and b_V equal the reference's in float64, with blocks of 4 rows, one or two heads
    at a time, padded rows that see no key, and a loss on the kept activations or on z too."""
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    monkeypatch.setattr("lorsa_hf._sparse.ATTENTION_BLOCK_ROWS", 4)
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_CHUNK_ELEMENTS", 4 * 24)
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    query, key, x = tensor(2, 3, 23, 8), tensor(2, 3, 23, 8), tensor(2, 23, 16)
    W_V, b_V, W_O = tensor(72, 16), tensor(72), tensor(72, 16).detach()
    mask = _attention_masks(2, 23, 23)[mask_form]
    results = [
        _attend_and_select(attend, query, key, value, mask, W_O, uses, activation=activation,
                           inputs=(query, key, x, W_V, b_V))
        for attend, value in (
            (sparse_attention_top_k, ValueProjection(x, W_V, b_V, 3)),
            (dense_attention_top_k, as_values(ValueProjection(x, W_V, b_V, 3))),
        )
    ]
    for projected, reference in zip(*results, strict=True):
        torch.testing.assert_close(projected, reference, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
@pytest.mark.parametrize("frozen", ["everything", "W_V"])
def test_gradients_through_a_partly_frozen_lorsa_equal_the_reference(monkeypatch, backward_from, frozen):
    """Attribution through a frozen Lorsa (gradient for the input only) and a frozen W_V: whatever still wants a
    gradient gets the reference's."""
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    results = []
    for lorsa in lorsa_pair("topk_abs"):
        for name, parameter in lorsa.named_parameters():
            parameter.requires_grad_(frozen == "W_V" and not name.endswith("W_V"))
        x = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = lorsa(x)
        (out.hidden_states.pow(2).sum() + out.top_k_values.abs().sum()).backward()
        results.append([x.grad] + [p.grad for p in lorsa.parameters() if p.requires_grad])
    assert len(results[0]) == (1 if frozen == "everything" else 8)
    for sparse_gradient, dense_gradient in zip(*results, strict=True):
        scale = dense_gradient.abs().max().item()
        torch.testing.assert_close(sparse_gradient, dense_gradient, atol=1e-5 * scale, rtol=1e-4)


def test_backward_from_inputs_where_it_is_cheaper():
    """The cost model picks, for the benchmark's layer sizes at their sequence lengths under a causal mask (blocks
    of 64 rows), the backward through x where g is large next to the keys and d and K is small, and through v
    otherwise: Pythia's narrow groups, long sequences, and K 512 at the start of K annealing."""
    from lorsa_hf._sparse import _backward_from_inputs, _query_blocks

    def cheaper_from_inputs(
        length: int, group_size: int, d: int, heads: int, top_k: int = 64, input_gradient=False, device_type="cpu"
    ):
        blocks = _query_blocks(torch.ones(length, length, dtype=torch.bool).tril()[None, None], length, length)
        return _backward_from_inputs(blocks, length, group_size, d, heads, top_k, input_gradient, device_type)

    assert not cheaper_from_inputs(256, group_size=128, d=768, heads=48)  # Pythia-160M
    assert cheaper_from_inputs(256, group_size=512, d=576, heads=9)  # SmolLM2-135M
    assert not cheaper_from_inputs(256, group_size=512, d=576, heads=9, top_k=512)
    assert cheaper_from_inputs(64, group_size=1024, d=4096, heads=32)  # Llama-3.1-8B
    assert not cheaper_from_inputs(4096, group_size=1024, d=4096, heads=32, input_gradient=True)
    # a device whose gather cost was not measured takes the route through v unless g is far larger than d
    assert not cheaper_from_inputs(256, group_size=512, d=576, heads=9, device_type="cuda")
    assert cheaper_from_inputs(64, group_size=1024, d=4096, heads=32, device_type="cuda")


def test_blocked_attention_skips_the_keys_a_causal_block_cannot_see():
    from lorsa_hf._sparse import _query_blocks

    causal = torch.ones(256, 256, dtype=torch.bool).tril()[None, None]
    # (first row, end row, keys seen, first key column to mask)
    assert _query_blocks(causal, 256, 256) == [
        (0, 64, 64, 1), (64, 128, 128, 65), (128, 192, 192, 129), (192, 256, 256, 193)
    ]
    after_prefix = torch.ones(64, 320, dtype=torch.bool).tril(256)[None, None]
    assert _query_blocks(after_prefix, 64, 320) == [(0, 64, 320, 257)]
    assert _query_blocks(None, 1, 300) == [(0, 1, 300, 300)]  # a decode step sees every cached key


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
def test_sparse_equals_dense_over_several_attention_blocks(monkeypatch, backward_from):
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    monkeypatch.setattr("lorsa_hf._sparse.ATTENTION_BLOCK_ROWS", 4)
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_CHUNK_ELEMENTS", 4 * 32 * 3)
    sparse, dense = lorsa_pair("topk_abs")
    x = torch.randn(2, 14, 64, generator=torch.Generator().manual_seed(0))
    assert_same_path_results(sparse, dense, x)


def _saved_for_backward(lorsa, x: torch.Tensor) -> list[tuple[int, ...]]:
    """Shapes of the floating-point tensors a training forward keeps for backward, other than parameters and the
    input."""
    shapes, excluded = [], {p.data_ptr() for p in lorsa.parameters()} | {x.data_ptr()}

    def pack(tensor):
        if tensor.data_ptr() not in excluded and tensor.is_floating_point():
            shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        lorsa(x, output_activations=False)
    return shapes


@pytest.mark.parametrize("backward_from", ["inputs", "values"])
def test_training_forward_keeps_no_attention_pattern_and_no_activations_of_every_head(monkeypatch, backward_from):
    """The sparse path keeps q, k, the [N, K] selection and v, or no v when its backward goes through x; the dense
    one also the [T, S] softmax pattern and [N, n_ov] activations (and v, in the layout its matmuls want)."""
    monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    monkeypatch.setattr("lorsa_hf._sparse.ATTENTION_BLOCK_ROWS", 4)
    sparse, dense = lorsa_pair("topk_abs", n_ov_heads=512)
    x = torch.randn(2, 20, 64)
    tokens, n_ov, n_qk = 2 * 20, 512, 4

    def kept(shapes):
        return {
            "pattern": any(shape[-2:] == (20, 20) for shape in shapes),
            "activations": (tokens, n_ov) in shapes,
            "values": (2, n_qk, 20, n_ov // n_qk) in shapes,
        }

    assert kept(_saved_for_backward(sparse, x)) == {
        "pattern": False, "activations": False, "values": backward_from == "values"
    }
    saved_dense = kept(_saved_for_backward(dense, x))
    assert (saved_dense["pattern"], saved_dense["activations"]) == (True, True)


def test_sparse_equals_dense_with_the_fused_attention():
    sparse, dense = lorsa_pair("topk_relu")  # g = 32 = 2 d_qk: sequences longer than 64 take the fused kernel
    x = torch.randn(1, 80, 64, generator=torch.Generator().manual_seed(0))
    assert_same_path_results(sparse, dense, x)


def test_float64_paths_agree_to_float64_precision():
    sparse, dense = lorsa_pair("topk_abs", dtype=torch.float64)
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    assert_same_path_results(sparse, dense, x, atol=1e-12, rtol=1e-10)


def _saved_by_decode(output: torch.Tensor) -> list[torch.Size]:
    """Shapes of what the autograd node that produced the decode output keeps for backward."""
    node = output.grad_fn
    while node is not None and "TopK" not in type(node).__name__ and "Mm" not in type(node).__name__:
        node = node.next_functions[0][0]
    saved = node.saved_tensors if hasattr(node, "saved_tensors") else (node._saved_self, node._saved_mat2)
    return [tensor.shape for tensor in saved]


def test_sparse_decode_keeps_only_the_selection_for_backward():
    """The sparse node keeps [N, K] indices and values and W_O; the dense decode keeps [N, n_ov] activations."""
    n_ov, tokens, top_k = 512, 2 * 16, 8
    sparse, dense = lorsa_pair("topk_abs", n_ov_heads=n_ov, top_k=top_k)
    x = torch.randn(2, 16, 64)
    saved_sparse = _saved_by_decode(sparse(x).hidden_states)
    saved_dense = _saved_by_decode(dense(x).hidden_states)
    assert sorted(map(tuple, saved_sparse)) == [(tokens, top_k), (tokens, top_k), (n_ov, 64)]
    assert (tokens, n_ov) in map(tuple, saved_dense)


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


def test_bfloat16_autocast_is_close_to_float32_and_trains():
    sparse, dense = lorsa_pair("topk_abs", n_ov_heads=256, top_k=16)
    x = torch.randn(2, 32, 64)
    with torch.no_grad():
        reference = sparse(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sparse(x)
        dense_out = dense(x)
    # sharp random attention: bf16 logits move some heads across the TopK boundary (see docs/performance.md)
    same = (out.top_k_indices[..., :, None] == reference.top_k_indices[..., None, :]).any(-1).float().mean()
    assert same > 0.9
    for result in (out, dense_out):
        relative = (result.hidden_states.float() - reference.hidden_states).norm() / reference.hidden_states.norm()
        assert relative < 0.1
    out.hidden_states.float().pow(2).mean().backward()
    for name, parameter in sparse.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_bfloat16_autocast_backward_through_inputs_equals_through_values(monkeypatch):
    """Under bf16 autocast both backward routes of the projected values give the same gradients, to bf16 precision
    (float32 weights, bf16 products)."""
    sparse, _ = lorsa_pair("topk_abs", n_ov_heads=256, top_k=16)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(0))
    gradients = []
    for from_inputs in (True, False):
        monkeypatch.setattr("lorsa_hf._sparse.BACKWARD_FROM_INPUTS", from_inputs)
        sparse.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sparse(x)
        (out.hidden_states.float().pow(2).mean() + 0.1 * out.top_k_values.float().abs().mean()).backward()
        gradients.append({name: parameter.grad.clone() for name, parameter in sparse.named_parameters()})
    for name, through_inputs in gradients[0].items():
        through_values = gradients[1][name]
        assert through_inputs.dtype == torch.float32, name
        scale = through_values.abs().max().item()
        torch.testing.assert_close(through_inputs, through_values, atol=3e-2 * scale, rtol=0, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("seq_len", [5, 40])
def test_projections_equal_the_reference_einsums(dtype, seq_len):
    """float32/64 and few tokens take batched matmuls over the groups, reduced precision with many tokens one
    matmul with a fused weight."""
    generator = torch.Generator().manual_seed(0)
    n_qk, d, d_qk, n_ov = 3, 16, 4, 12

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    weights = (tensor(n_qk, d, d_qk), tensor(n_qk, d_qk), tensor(n_qk, d, d_qk), tensor(n_qk, d_qk))
    weights += (tensor(n_ov, d), tensor(n_ov))
    x = tensor(2, seq_len, d)
    expected = reference_projections(x.double(), *(weight.double() for weight in weights))
    actual = project_queries_keys_values(x, *weights)
    assert isinstance(actual[2], ValueProjection)  # v is projected where it is used: `as_values` computes it
    actual = (*actual[:2], as_values(actual[2]))
    tolerance = {"rtol": 0, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-2, "atol": 5e-2}
    for result, reference in zip(actual, expected, strict=True):
        assert result.dtype == dtype and result.shape == reference.shape
        torch.testing.assert_close(result.double(), reference, **tolerance)


def test_bfloat16_weights_without_autocast():
    sparse, dense = lorsa_pair("topk_relu", dtype=torch.bfloat16)
    x = torch.randn(2, 8, 64, dtype=torch.bfloat16)
    out = sparse(x)
    out.hidden_states.float().sum().backward()
    assert out.hidden_states.dtype == torch.bfloat16
    assert all(torch.isfinite(p.grad.float()).all() for p in sparse.parameters())


def test_config_validates_implementation_and_cache_format():
    with pytest.raises(ValueError, match="LorsaConfig.implementation"):
        LorsaConfig(implementation="fast")
    with pytest.raises(ValueError, match="LorsaConfig.cache_format"):
        LorsaConfig(cache_format="x")
    assert LorsaConfig().implementation == "sparse"


@requires_cuda
@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
def test_cuda_sparse_equals_dense(activation):
    sparse, dense = lorsa_pair(activation, device="cuda")
    x = torch.randn(2, 12, 64, device="cuda")
    assert_same_path_results(sparse, dense, x, atol=1e-4, rtol=1e-3)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sparse_decode_kernel_equals_embedding_bag(dtype):
    from lorsa_hf.kernels import triton_sparse_decode

    if triton_sparse_decode is None:
        pytest.skip("Triton is not installed: the CUDA path falls back to embedding_bag")
    generator = torch.Generator(device="cuda").manual_seed(0)
    W_O = torch.randn(3000, 300, device="cuda", generator=generator).to(dtype)
    indices = torch.randint(0, 3000, (77, 45), device="cuda", generator=generator)
    values = torch.randn(77, 45, device="cuda", generator=generator).to(dtype)
    expected = torch.nn.functional.embedding_bag(indices, W_O.float(), per_sample_weights=values.float(), mode="sum")
    actual = sparse_decode(values, indices, W_O)
    torch.testing.assert_close(actual.float(), expected, atol=1e-2 if dtype == torch.bfloat16 else 1e-4, rtol=1e-2)


_INTERPRETED_KERNEL = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from lorsa_hf.kernels.triton_decode import triton_sparse_decode

    torch.manual_seed(0)
    for n_ov, d, tokens, top_k in ((3000, 300, 7, 45), (128, 64, 5, 128), (50, 17, 3, 1)):
        W_O = torch.randn(n_ov, d)
        indices = torch.randint(0, n_ov, (tokens, top_k))
        values = torch.randn(tokens, top_k)
        expected = F.embedding_bag(indices, W_O, per_sample_weights=values, mode="sum")
        torch.testing.assert_close(triton_sparse_decode(values, indices, W_O), expected, atol=1e-4, rtol=1e-4)
    W_O = torch.randn(64, 200)[:, :100]
    indices, values = torch.randint(0, 64, (4, 8)), torch.randn(4, 8)
    expected = F.embedding_bag(indices, W_O.contiguous(), per_sample_weights=values, mode="sum")
    torch.testing.assert_close(triton_sparse_decode(values, indices, W_O), expected, atol=1e-4, rtol=1e-4)
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
def test_triton_kernel_in_the_interpreter_equals_embedding_bag():
    """The kernel's logic on CPU through Triton's interpreter (TRITON_INTERPRET=1), where no GPU is present."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run([sys.executable, "-c", _INTERPRETED_KERNEL], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
