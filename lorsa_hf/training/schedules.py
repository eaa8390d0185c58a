"""The learning-rate and K schedules of a run, as functions of the step and the `training` section."""

from __future__ import annotations

import math

from .recipe import TrainingSection


def top_k_at(step: int, total_steps: int, training: TrainingSection, target: int) -> int:
    """K annealed from `training.k_initial` to the target over `k_anneal_fraction` of the steps."""
    if training.k_initial is None:
        return target
    anneal_steps = max(1, round(total_steps * training.k_anneal_fraction))
    if step >= anneal_steps:
        return target
    progress = step / anneal_steps
    start = training.k_initial
    if training.k_anneal == "linear":
        k = start + (target - start) * progress
    else:
        k = start * (target / start) ** progress
    return max(1, int(round(k)))


def lr_factor(step: int, total_steps: int, training: TrainingSection) -> float:
    """Linear warm-up, then cosine/linear decay to `final_lr_fraction` (or constant)."""
    warmup = round(total_steps * training.warmup_fraction)
    if step < warmup:
        return (step + 1) / warmup
    if training.lr_decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    final = training.final_lr_fraction
    if training.lr_decay == "linear":
        return 1.0 - (1.0 - final) * progress
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


__all__ = ["lr_factor", "top_k_at"]
