"""The blocked attention node and the fused kernel equal the reference attention and selection, z and every
gradient, for every mask form; the cost model picks the backward route through x where it is cheaper."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf.ops.attention import backward_from_inputs, sparse_attention_top_k, sparse_projected_attention_top_k
from lorsa_hf.ops.blocks import query_blocks
from lorsa_hf.ops.reference import dense_attention_top_k, dense_projected_attention_top_k


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
    monkeypatch.setattr("lorsa_hf.ops.blocks.ATTENTION_BLOCK_ROWS", 4)
    # backward: one or two heads at a time
    monkeypatch.setattr("lorsa_hf.ops.attention_backward.BACKWARD_CHUNK_ELEMENTS", 4 * 24)
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
    """v handed over as the x, W_V and b_V that project it: the node projects v itself and its backward reaches
    x, W_V and b_V either through v or through x (softmax rows sum to one). z, the kept activations and the
    gradients of q, k, x, W_V and b_V equal the reference's in float64, with blocks of 4 rows, one or two heads
    at a time, padded rows that see no key, and a loss on the kept activations or on z too."""
    monkeypatch.setattr("lorsa_hf.ops.attention.BACKWARD_FROM_INPUTS", backward_from == "inputs")
    monkeypatch.setattr("lorsa_hf.ops.blocks.ATTENTION_BLOCK_ROWS", 4)
    monkeypatch.setattr("lorsa_hf.ops.attention_backward.BACKWARD_CHUNK_ELEMENTS", 4 * 24)
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)

    query, key, x = tensor(2, 3, 23, 8), tensor(2, 3, 23, 8), tensor(2, 23, 16)
    W_V, b_V, W_O = tensor(72, 16), tensor(72), tensor(72, 16).detach()
    mask = _attention_masks(2, 23, 23)[mask_form]

    def over_x(attend):  # attention over the values of x, which it projects itself
        return lambda query, key, _, *settings: attend(query, key, x, W_V, b_V, *settings)

    results = [
        _attend_and_select(over_x(attend), query, key, None, mask, W_O, uses, activation=activation,
                           inputs=(query, key, x, W_V, b_V))
        for attend in (sparse_projected_attention_top_k, dense_projected_attention_top_k)
    ]
    for projected, reference in zip(*results, strict=True):
        torch.testing.assert_close(projected, reference, atol=1e-12, rtol=1e-10)


def test_backward_from_inputs_where_it_is_cheaper():
    """The cost model picks, for the benchmark's layer sizes at their sequence lengths under a causal mask (blocks
    of 64 rows), the backward through x where g is large next to the keys and d and K is small, and through v
    otherwise: Pythia's narrow groups, long sequences, and K 512 at the start of K annealing."""
    def cheaper_from_inputs(
        length: int, group_size: int, d: int, heads: int, top_k: int = 64, input_gradient=False, device_type="cpu"
    ):
        blocks = query_blocks(torch.ones(length, length, dtype=torch.bool).tril()[None, None], length, length)
        return backward_from_inputs(blocks, length, group_size, d, heads, top_k, input_gradient, device_type)

    assert not cheaper_from_inputs(256, group_size=128, d=768, heads=48)  # Pythia-160M
    assert cheaper_from_inputs(256, group_size=512, d=576, heads=9)  # SmolLM2-135M
    assert not cheaper_from_inputs(256, group_size=512, d=576, heads=9, top_k=512)
    assert cheaper_from_inputs(64, group_size=1024, d=4096, heads=32)  # Llama-3.1-8B
    assert not cheaper_from_inputs(4096, group_size=1024, d=4096, heads=32, input_gradient=True)
    # a device whose gather cost was not measured takes the route through v unless g is far larger than d
    assert not cheaper_from_inputs(256, group_size=512, d=576, heads=9, device_type="cuda")
    assert cheaper_from_inputs(64, group_size=1024, d=4096, heads=32, device_type="cuda")
