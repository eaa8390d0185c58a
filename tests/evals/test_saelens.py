"""The SAELens-named headline metrics are this package's own metrics, renamed or combined as docs/evals.md says."""

from __future__ import annotations

import pytest

from lorsa_hf.evals.saelens import SAELENS_METRICS, kl_div_score, saelens_metrics

RECONSTRUCTION = {
    "3": {"fvu": 0.25, "explained_variance": 0.75, "l0": 64.0, "relative_norm": 0.9, "cosine_similarity": 0.86},
}
DOWNSTREAM = {
    "layer_sets": {
        "3": {"loss_recovered_zero": 0.8, "kl_spliced": 0.05, "kl_zero": 0.5},
        "all": {"loss_recovered_zero": 0.6, "kl_spliced": 0.2, "kl_zero": 0.8},
    }
}


def test_names_and_values():
    metrics = saelens_metrics(RECONSTRUCTION, DOWNSTREAM)
    assert list(SAELENS_METRICS) == ["explained_variance", "l0", "ce_loss_score", "kl_div_score", "l2_ratio", "cossim"]
    assert metrics["3"] == {
        "explained_variance": 0.75, "l0": 64.0, "ce_loss_score": 0.8, "kl_div_score": pytest.approx(0.9),
        "l2_ratio": 0.9, "cossim": 0.86,
    }
    assert metrics["all"] == {"ce_loss_score": 0.6, "kl_div_score": pytest.approx(0.75)}


def test_kl_div_score_without_an_ablation_effect_is_undefined():
    assert kl_div_score(0.1, 0.0) is None and kl_div_score(None, 0.5) is None
    assert kl_div_score(0.0, 0.5) == 1.0
