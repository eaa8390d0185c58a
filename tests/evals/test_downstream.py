"""The downstream eval reruns only the layers from the first replaced one and takes CE and KL from the logits'
log-normaliser; it gives the numbers of the straightforward computation (a full forward per condition and
float32 log-probabilities, as the eval computed them before) to float32 tolerance."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lorsa_hf.evals.downstream import attention_output_means, downstream_metrics, residual_streams, resumed_at
from lorsa_hf.evals.replacements import ZeroAblation, lorsa_replacements, replaced_attention
from tests.conftest import make_base, make_lorsa
from tests.evals.conftest import BOS, batches

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_eval import straightforward_downstream  # noqa: E402  (the computation the eval did before)

LAYERS = [1, 2]


def test_same_numbers_as_a_full_forward_per_condition(arch):
    model = make_base(arch)
    lorsa = make_lorsa(model.config, LAYERS)
    replacements = lorsa_replacements(model, lorsa)
    means, _ = attention_output_means(model, LAYERS, batches(2), exclude_token_ids=(BOS,))
    fast = downstream_metrics(model, replacements, batches(1), means=means, exclude_token_ids=(BOS,))
    ce_clean, n, expected = straightforward_downstream(model, replacements, batches(1), means, (BOS,))
    assert fast["n_tokens"] == n == 2 * 2 * 14
    assert fast["ce_clean"] == pytest.approx(ce_clean, rel=1e-6)
    assert set(fast["layer_sets"]) == {"1", "2", "all"}
    for (name, condition), (ce, kl) in expected.items():
        entry = fast["layer_sets"][name]
        assert entry[f"ce_{condition}"] == pytest.approx(ce, rel=1e-6)
        assert entry[f"kl_{condition}"] == pytest.approx(kl, rel=1e-4, abs=1e-6)
        assert entry[f"kl_{condition}"] > 0


def test_resuming_at_a_layer_gives_the_full_forward_logits_exactly(arch):
    model = make_base(arch)
    (input_ids,) = batches(3, n_batches=1)
    residuals: dict[int, torch.Tensor] = {}
    with torch.no_grad(), residual_streams(model, [0, 2], residuals):
        full = model(input_ids=input_ids).logits
    assert set(residuals) == {2}
    zeros = {2: ZeroAblation()}
    with torch.no_grad():
        with replaced_attention(model, zeros):
            ablated = model(input_ids=input_ids).logits
            with resumed_at(model, 2, residuals[2]):
                resumed = model(input_ids=input_ids).logits
        assert torch.equal(resumed, ablated) and not torch.equal(resumed, full)
        assert torch.equal(model(input_ids=input_ids).logits, full)  # every decoder layer is back
    with pytest.raises(ValueError, match="needs the residual stream"):
        with resumed_at(model, 2, None):
            pass
