"""Logit effects are W_O[i] through the final norm's gain and the unembedding; the direct logit attributions of
the heads active at a position, with the rest of the residual stream, add up to the model's logits there."""

from __future__ import annotations

import torch

from lorsa_hf.analysis import Unembedding, direct_logit_attribution, logit_effects
from lorsa_hf.analysis.reading import spliced_at
from tests.conftest import make_base, make_lorsa


def test_logit_effects_are_the_output_directions_through_the_norm_gain_and_unembedding(model, lorsa):
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.5, 1.5)
    effects = logit_effects(lorsa, 1, Unembedding.from_model(model), k=3, chunk=5)
    W_O = lorsa.layer(1).W_O.detach().double()
    logits = (W_O * model.model.norm.weight.double()) @ model.lm_head.weight.double().T
    assert torch.equal(effects.promoted, logits.topk(3).indices)
    assert torch.allclose(effects.promoted_logits, logits.topk(3).values, atol=1e-12)
    assert torch.equal(effects.suppressed, logits.topk(3, largest=False).indices)


def test_a_layernorm_model_is_read_through_its_centred_gain():
    model = make_base("gpt_neox")
    unembedding = Unembedding.from_model(model)
    assert unembedding.centred
    direction = torch.randn(3, 64, dtype=torch.float64)
    norm = model.gpt_neox.final_layer_norm
    expected = ((direction - direction.mean(-1, keepdim=True)) * norm.weight.double()) @ model.lm_head.weight.double().T
    assert torch.allclose(unembedding.logits(direction), expected, atol=1e-12)


def test_direct_logit_attributions_and_the_rest_of_the_stream_add_up_to_the_logits():
    model = make_base("llama", num_hidden_layers=2).double()
    lorsa = make_lorsa(model.config, layers=[1], n_ov_heads=32, top_k=4, dtype=torch.float64)
    ids, position = torch.tensor([0, 5, 9, 14, 3, 7]), 4
    read = {}
    with spliced_at(model, lorsa, 1) as module:
        module.register_forward_pre_hook(lambda m, a, kw: (a, {**kw, "output_activations": True}), with_kwargs=True)
        module.register_forward_hook(lambda m, a, out: read.update(out=out))
        model.model.norm.register_forward_pre_hook(lambda m, a: read.update(residual=a[0][0, position]))
        with torch.no_grad():
            logits = model(ids[None]).logits[0, position]
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
        model.model.norm._forward_pre_hooks.clear()
    heads = read["out"].top_k_indices[0, position].tolist()
    unembedding = Unembedding.from_model(model)
    scale = torch.rsqrt(read["residual"].pow(2).mean() + unembedding.eps)
    heads_output = sum(read["out"].activations()[0, position, h] * lorsa.layer(1).W_O[h] for h in heads)
    total = unembedding.logits(read["residual"] - heads_output) * scale
    for head in heads:
        attribution = direct_logit_attribution(model, lorsa, 1, ids, position, head)
        assert attribution.activation == float(read["out"].activations()[0, position, head])
        total = total + attribution.logits
    assert torch.allclose(total, logits.double(), atol=1e-9)
