"""Per-layer sums (`LayerStats`), their one flat layout for reduction, the metrics from them, the dead tracker."""

from __future__ import annotations

import json

import pytest
import torch

from lorsa_hf.training.metrics import (
    DeadHeadTracker,
    LayerStats,
    MetricsLog,
    add_stats,
    flatten_stats,
    reduce_stats,
    summarize,
    unflatten_stats,
)


def _stats(seed: int, d: int = 3, n_ov: int = 5) -> LayerStats:
    generator = torch.Generator().manual_seed(seed)
    prediction, target = torch.randn(2, 4, d, generator=generator), torch.randn(2, 4, d, generator=generator)
    values = torch.tensor([[[1.0, 0.0]] * 4, [[2.0, -1.0]] * 4])
    indices = torch.tensor([[[0, 1]] * 4, [[1, 3]] * 4])
    mask = torch.tensor([[False, True, True, True], [True, True, True, False]])
    return LayerStats.measure(prediction, target, values, indices, mask, n_ov)


def test_measure_sums_over_the_loss_tokens():
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 4, 3, generator=generator), torch.randn(2, 4, 3, generator=generator)
    stats = _stats(0)
    mask = torch.tensor([[False, True, True, True], [True, True, True, False]])
    y = target[mask].double()
    assert float(stats.squared_error) == pytest.approx(float((prediction[mask].double() - y).pow(2).sum()))
    assert float(stats.tokens) == 6 and float(stats.active) == 3 + 6  # row 0: one active head, row 1: two
    assert stats.fired.tolist() == [3.0, 3.0, 0.0, 3.0, 0.0]  # head 1 in row 0 is selected with value 0
    fvu = float((prediction[mask].double() - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert stats.fvu() == pytest.approx(fvu, rel=1e-12) and stats.l0() == pytest.approx(1.5)
    assert stats.never_fired_fraction() == pytest.approx(2 / 5)


def test_flat_layout_round_trips_and_reduces_as_a_sum():
    stats = {3: _stats(1), 7: _stats(2)}
    flat = flatten_stats(stats)
    assert flat.shape == (2, 4 + 3 + 5) and flat.dtype == torch.float64
    back = unflatten_stats(flat, [3, 7], hidden_size=3)
    for layer in (3, 7):
        for name in ("squared_error", "target_square", "tokens", "active", "target_sum", "fired"):
            assert torch.equal(getattr(back[layer], name), getattr(stats[layer], name)), name
    doubled = reduce_stats(stats, lambda tensor: tensor * 2)  # what a sum over two equal processes gives
    assert list(doubled) == [3, 7] and torch.equal(flatten_stats(doubled), flatten_stats(add_stats(stats, stats)))


def test_summary_per_layer_and_mean():
    stats = {0: _stats(1), 1: _stats(2)}
    metrics = summarize(stats, prefix="heldout/")
    assert metrics["heldout/layer1/fvu"] == stats[1].fvu()
    assert metrics["heldout/fvu"] == (stats[0].fvu() + stats[1].fvu()) / 2
    assert metrics["heldout/dead_fraction"] == pytest.approx(2 / 5)
    tracker = DeadHeadTracker([0, 1], n_ov_heads=5, dead_tokens=10)
    assert summarize(stats, tracker=tracker)["layer0/dead_fraction"] == 0.0


def test_dead_tracker_counts_tokens_since_each_head_fired():
    tracker = DeadHeadTracker([4], n_ov_heads=5, dead_tokens=12)
    stats = {4: _stats(0)}  # 6 tokens; heads 0, 1 and 3 fire
    tracker.update(stats)
    tracker.update(stats)
    assert tracker.tokens_since_fired[0].tolist() == [0, 0, 12, 0, 12]
    assert tracker.dead(4).tolist() == [False, False, True, False, True]


def test_metrics_log_truncates_what_came_after_a_step(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 0.5}, step)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')  # a line cut short by a kill
    log.truncate_after(2)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    MetricsLog(tmp_path / "other.jsonl", enabled=False).write({"step": 1}, 1)
    assert not (tmp_path / "other.jsonl").exists()
