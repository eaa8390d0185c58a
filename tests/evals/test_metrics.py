"""Reconstruction and downstream metrics on tiny random models: their fixed points hold exactly."""

from __future__ import annotations

import math

import pytest
import torch

from lorsa_hf.evals.data import position_mask
from lorsa_hf.evals.downstream import attention_output_means, downstream_metrics, loss_recovered
from lorsa_hf.evals.reconstruction import ReconstructionAccumulator, reconstruction_metrics
from lorsa_hf.evals.replacements import ZeroAblation, lorsa_replacements, original_attention
from tests.conftest import make_base, make_lorsa
from tests.evals.conftest import BOS, batches

LAYERS = [0, 2]


def test_fvu_of_perfect_and_mean_predictors():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(300, 8, generator=generator, dtype=torch.float64) * 3 + 100.0
    perfect, mean = ReconstructionAccumulator(8), ReconstructionAccumulator(8)
    for chunk in target.split(7):  # streamed in uneven batches
        perfect.update(chunk, chunk)
        mean.update(chunk, target.mean(0).expand_as(chunk))
    assert perfect.compute()["fvu"] == 0.0
    assert perfect.compute()["cosine_similarity"] == pytest.approx(1.0)
    assert mean.compute()["fvu"] == pytest.approx(1.0, abs=1e-12)
    assert mean.compute()["explained_variance"] == pytest.approx(0.0, abs=1e-12)


def test_activation_statistics():
    accumulator = ReconstructionAccumulator(2, n_heads=4)
    target = torch.ones(3, 2)
    indices = torch.tensor([[0, 1], [0, 2], [0, 1]])
    values = torch.tensor([[1.0, 0.0], [2.0, 3.0], [1.0, 1.0]])  # one selected head is zero (topk_relu)
    accumulator.update(target, target, indices, values)
    metrics = accumulator.compute()
    assert metrics["l0"] == pytest.approx(5 / 3)
    assert metrics["dead_heads"] == 1 and metrics["dead_fraction"] == 0.25
    assert accumulator.head_frequencies().tolist() == [1.0, 1 / 3, 1 / 3, 0.0]
    histogram = metrics["frequency_histogram"]
    assert sum(histogram["counts"]) == 3 and histogram["dead"] == 1


def test_position_mask_excludes_bos_and_padding():
    ids = torch.tensor([[0, 5, 6, 1, 1]])
    assert position_mask(ids, (0, 1)).tolist() == [[False, True, True, False, False]]


def test_reconstruction_through_the_model(arch):
    model = make_base(arch)
    identity = reconstruction_metrics(model, original_attention(model, LAYERS), batches(1), exclude_token_ids=(BOS,))
    for accumulator in identity.values():
        metrics = accumulator.compute()
        assert metrics["fvu"] == 0.0 and metrics["n_tokens"] == 2 * 2 * 15
    lorsa = make_lorsa(model.config, LAYERS)
    results = reconstruction_metrics(model, lorsa_replacements(model, lorsa), batches(1), exclude_token_ids=(BOS,))
    for accumulator in results.values():
        metrics = accumulator.compute()
        assert math.isfinite(metrics["fvu"]) and metrics["fvu"] > 0
        assert 0 < metrics["l0"] <= lorsa.config.top_k
        assert 0 <= metrics["dead_fraction"] < 1


def test_loss_recovered_and_kl(arch):
    model = make_base(arch)
    means, n_mean = attention_output_means(model, LAYERS, batches(2), exclude_token_ids=(BOS,))
    assert n_mean == 2 * 2 * 15 and set(means) == set(LAYERS)
    identity = downstream_metrics(
        model, original_attention(model, LAYERS), batches(1), means=means, exclude_token_ids=(BOS,)
    )
    assert identity["n_tokens"] == 2 * 2 * 14
    assert set(identity["layer_sets"]) == {"0", "2", "all"}
    for entry in identity["layer_sets"].values():
        assert entry["ce_spliced"] == identity["ce_clean"]
        assert entry["kl_spliced"] == 0.0
        assert entry["loss_recovered_zero"] == 1.0 and entry["loss_recovered_mean"] == 1.0
        assert entry["ce_zero"] != identity["ce_clean"] and entry["kl_zero"] > 0
    zeros = {layer: ZeroAblation() for layer in LAYERS}
    ablated = downstream_metrics(model, zeros, batches(1), means=means, exclude_token_ids=(BOS,))
    for entry in ablated["layer_sets"].values():
        assert entry["loss_recovered_zero"] == 0.0
    lorsa = make_lorsa(model.config, LAYERS)
    spliced = downstream_metrics(model, lorsa_replacements(model, lorsa), batches(1), exclude_token_ids=(BOS,))
    entry = spliced["layer_sets"]["all"]
    assert entry["kl_spliced"] > 0 and entry["ce_mean"] is None and entry["loss_recovered_mean"] is None
    with torch.no_grad():  # the model is left exactly as it was
        assert [type(m).__name__ for m in original_attention(model, LAYERS).values()] == [
            type(m).__name__ for m in original_attention(make_base(arch), LAYERS).values()
        ]


def test_loss_recovered_formula():
    assert loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert loss_recovered(2.0, 3.0, 4.0) == 0.5
    assert math.isnan(loss_recovered(2.0, 3.0, 2.0))
