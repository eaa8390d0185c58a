"""K annealing and the learning-rate schedule, from the training section."""

from __future__ import annotations

import pytest

from lorsa_hf.training import recipe_from_dict
from lorsa_hf.training.schedules import lr_factor, top_k_at


def test_schedules():
    recipe = recipe_from_dict(
        {"lorsa": {"layers": [0]}, "training": {"max_steps": 100, "k_initial": 256, "k_anneal_fraction": 0.1,
                                                "warmup_fraction": 0.1, "final_lr_fraction": 0.01}}
    )
    assert [top_k_at(s, 100, recipe.training, 16) for s in (0, 5, 10, 99)] == [256, 136, 16, 16]
    recipe.training.k_anneal = "exponential"
    assert [top_k_at(s, 100, recipe.training, 16) for s in (0, 5, 10)] == [256, 64, 16]
    training = recipe.training
    assert lr_factor(0, 100, training) == pytest.approx(0.1) and lr_factor(9, 100, training) == pytest.approx(1.0)
    assert lr_factor(10, 100, training) == pytest.approx(1.0) and lr_factor(100, 100, training) == pytest.approx(0.01)
