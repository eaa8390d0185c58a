"""The base-model activation source: attention inputs and outputs captured by hooks, the forward cut short."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf.adapters import get_adapter
from lorsa_hf.training.activations import ActivationSource

from .conftest import make_model


@pytest.mark.parametrize("arch", ["llama", "gpt_neox"])
def test_activation_source_captures_attention_and_stops_early(tokenizer, arch):
    model = make_model(arch, tokenizer, layers=4)
    adapter = get_adapter(model)
    ids = torch.randint(3, len(tokenizer), (2, 12))
    attention = torch.ones_like(ids)
    reference = {}

    def keep(layer):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            reference[layer] = (hidden.clone(), output[0].clone())

        return hook

    handles = [adapter.get_attention(model, i).register_forward_hook(keep(i), with_kwargs=True) for i in range(4)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=attention)
    for handle in handles:
        handle.remove()

    ran = []
    later = adapter.decoder_layers(model)[3].register_forward_pre_hook(lambda *args: ran.append(3))
    captured = ActivationSource(model, [2, 0])(ids, attention)
    later.remove()
    assert sorted(captured) == [0, 2] and ran == []
    for layer in (0, 2):
        assert torch.equal(captured[layer].inputs, reference[layer][0])
        assert torch.equal(captured[layer].outputs, reference[layer][1])
    assert all(not p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="layers 0..3"):
        ActivationSource(model, [4])
