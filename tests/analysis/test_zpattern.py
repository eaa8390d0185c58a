"""z-pattern contributions come from the layer's own code and sum to z exactly (float64, 1e-10): both selection
modes, both implementations, QK norm, partial rotary, padding, in a spliced base model."""

from __future__ import annotations

import pytest
import torch

from lorsa_hf.analysis import sparse_contributions, z_pattern
from lorsa_hf.analysis.reading import LayerReader, spliced_at
from tests.conftest import make_base, make_lorsa


@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
@pytest.mark.parametrize(("arch", "overrides"), [
    ("llama", {}), ("llama", {"use_qk_norm": True, "implementation": "dense"}), ("gpt_neox", {}),
])
def test_contributions_sum_to_z_with_padding(activation, arch, overrides):
    model = make_base(arch).double()
    lorsa = make_lorsa(model.config, layers=[1], n_ov_heads=32, top_k=4, activation=activation,
                       dtype=torch.float64, **overrides)
    input_ids = torch.randint(3, 90, (3, 12), generator=torch.Generator().manual_seed(1))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 8:] = 0  # right padding
    attention_mask[2, 5:] = 0
    with spliced_at(model, lorsa, 1) as module:
        read = LayerReader(model, module)(input_ids, attention_mask)
        pattern = z_pattern(module, read.hidden_states, **read.arguments)
    z = read.output.z
    real = attention_mask.bool()
    for head in range(32):
        for batch in range(3):
            total = pattern.contributions(head, batch).sum(-1)
            assert torch.allclose(total[real[batch]], z[batch, real[batch], head], rtol=0, atol=1e-10)
    assert pattern.pattern[2, :, 6, 5:].abs().max() == 0  # no query attends to a padded key
    keys, _ = sparse_contributions(pattern.at(0, 7, 0), fraction=0.0)
    assert keys.max() <= 7  # nothing after the query contributes


def test_the_sparse_form_keeps_contributions_above_the_fraction_of_the_largest():
    contributions = torch.tensor([0.5, -2.0, 0.05, 1.0, 0.0])
    keys, values = sparse_contributions(contributions, fraction=0.3)
    assert keys.tolist() == [1, 3] and values.tolist() == [-2.0, 1.0]
    with pytest.raises(ValueError, match="fraction must be between 0 and 1"):
        sparse_contributions(contributions, fraction=1.5)
