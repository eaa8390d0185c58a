"""What training measures: per-layer sums over loss tokens (`LayerStats`), the metrics derived from them, the
dead-head tracker, and the `metrics.jsonl` log.

`LayerStats` are sums, so they add over steps, batches and processes. Processes reduce them as one flat
float64 tensor (`flatten_stats` / `unflatten_stats`, the only place that knows the layout).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_text


@dataclass
class LayerStats:
    """One layer's float64 sums over loss tokens."""

    squared_error: torch.Tensor
    """sum |y - y_hat|^2 (a scalar)."""
    target_square: torch.Tensor
    """sum |y|^2 (a scalar)."""
    tokens: torch.Tensor
    """Loss tokens counted (a scalar)."""
    active: torch.Tensor
    """Active heads summed over tokens (a scalar)."""
    target_sum: torch.Tensor
    """sum y, [d]: with `target_square` it gives the target's variance."""
    fired: torch.Tensor
    """Times each head was active, [n_ov]."""

    @classmethod
    def zeros(cls, hidden_size: int, n_ov_heads: int, device: torch.device | str) -> LayerStats:
        def scalar() -> torch.Tensor:
            return torch.zeros((), dtype=torch.float64, device=device)

        vector = torch.zeros(hidden_size, dtype=torch.float64, device=device)
        heads = torch.zeros(n_ov_heads, dtype=torch.float64, device=device)
        return cls(scalar(), scalar(), scalar(), scalar(), vector, heads)

    @classmethod
    def measure(
        cls, prediction: torch.Tensor, target: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
        mask: torch.Tensor, n_ov_heads: int,
    ) -> LayerStats:
        """Sums over the positions of `mask` of a layer's prediction against its target, and of its selected
        head values (zero: not active) and their indices."""
        target = target[mask].double()
        error = prediction.detach()[mask].double() - target
        active = values.detach()[mask] != 0
        fired = torch.bincount(indices[mask][active], minlength=n_ov_heads)
        return cls(
            error.pow(2).sum(), target.pow(2).sum(), mask.sum().double(), active.sum().double(), target.sum(0),
            fired.double(),
        )

    def __add__(self, other: LayerStats) -> LayerStats:
        return LayerStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def fvu(self) -> float:
        """Fraction of the target's variance left unexplained."""
        tokens = self._token_count()
        variance = float(self.target_square.cpu()) - float(self.target_sum.cpu().pow(2).sum()) / tokens
        return float(self.squared_error.cpu()) / max(variance, 1e-30)

    def l0(self) -> float:
        """Active heads per token."""
        return float(self.active.cpu()) / self._token_count()

    def never_fired_fraction(self) -> float:
        """Fraction of heads not active on any of the tokens."""
        return float((self.fired.cpu() == 0).double().mean())

    def _token_count(self) -> float:
        return max(float(self.tokens.cpu()), 1.0)


Stats = dict[int, LayerStats]
"""Per base-model layer, in the run's layer order."""


def add_stats(total: Stats | None, stats: Stats) -> Stats:
    return dict(stats) if total is None else {layer: total[layer] + stats[layer] for layer in total}


def flatten_stats(stats: Stats) -> torch.Tensor:
    """[layers, 4 + d + n_ov] float64: the layout processes reduce."""
    rows = [
        torch.cat([s.squared_error[None], s.target_square[None], s.tokens[None], s.active[None], s.target_sum, s.fired])
        for s in stats.values()
    ]
    return torch.stack(rows)


def unflatten_stats(flat: torch.Tensor, layers: Iterable[int], hidden_size: int) -> Stats:
    """The inverse of `flatten_stats`, as views into `flat`."""
    d = hidden_size
    return {
        layer: LayerStats(row[0], row[1], row[2], row[3], row[4 : 4 + d], row[4 + d :])
        for layer, row in zip(layers, flat, strict=True)
    }


def reduce_stats(stats: Stats, reduce: Callable[[torch.Tensor], torch.Tensor]) -> Stats:
    """`stats` summed over processes by `reduce` (a sum over processes of one tensor)."""
    hidden_size = next(iter(stats.values())).target_sum.shape[0]
    return unflatten_stats(reduce(flatten_stats(stats)), stats, hidden_size)


class DeadHeadTracker:
    """Loss tokens since each head of each layer was last active; a head is dead after `dead_tokens`."""

    def __init__(self, layers: list[int], n_ov_heads: int, dead_tokens: int) -> None:
        self.layers = list(layers)
        self.dead_tokens = dead_tokens
        self.tokens_since_fired = torch.zeros(len(self.layers), n_ov_heads, dtype=torch.long)

    def dead(self, layer: int) -> torch.Tensor:
        """Boolean [n_ov]: the heads of base-model layer `layer` not active for `dead_tokens` loss tokens."""
        return self.tokens_since_fired[self.layers.index(layer)] >= self.dead_tokens

    def update(self, stats: Stats) -> None:
        """Count a step's tokens (summed over processes) and reset the heads that fired in it."""
        for position, layer in enumerate(self.layers):
            fired = stats[layer].fired.cpu() > 0
            self.tokens_since_fired[position] += int(stats[layer].tokens)
            self.tokens_since_fired[position][fired] = 0


def summarize(stats: Stats, prefix: str = "", tracker: DeadHeadTracker | None = None) -> dict[str, float]:
    """FVU, L0 and dead fraction per layer and their means over layers. The dead fraction is the tracker's
    when given (training), else the fraction of heads never active in `stats` (held-out)."""
    metrics: dict[str, float] = {}
    for layer, layer_stats in stats.items():
        metrics[f"{prefix}layer{layer}/fvu"] = layer_stats.fvu()
        metrics[f"{prefix}layer{layer}/l0"] = layer_stats.l0()
        if tracker is None:
            dead_fraction = layer_stats.never_fired_fraction()
        else:
            dead_fraction = float(tracker.dead(layer).double().mean())
        metrics[f"{prefix}layer{layer}/dead_fraction"] = dead_fraction
    for name in ("fvu", "l0", "dead_fraction"):
        values = [metrics[f"{prefix}layer{layer}/{name}"] for layer in stats]
        metrics[f"{prefix}{name}"] = sum(values) / len(values)
    return metrics


class MetricsLog:
    """`metrics.jsonl` (one JSON object per line, written by the main process) and the optional trackers."""

    def __init__(self, path: Path, enabled: bool, tracker_log: Callable[..., None] | None = None) -> None:
        self.path, self.enabled, self.tracker_log = path, enabled, tracker_log

    def write(self, metrics: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(metrics) + "\n")
        if self.tracker_log is not None:
            numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and k != "step"}
            self.tracker_log(numbers, step=int(metrics.get("step", step)))

    def truncate_after(self, step: int) -> None:
        """Drop what a killed run logged after `step` (and a line cut short by the kill)."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("step", 0) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(line + "\n" for line in kept))


__all__ = [
    "DeadHeadTracker", "LayerStats", "MetricsLog", "Stats", "add_stats", "flatten_stats", "reduce_stats",
    "summarize", "unflatten_stats",
]
