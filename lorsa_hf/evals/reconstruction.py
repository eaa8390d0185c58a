"""Reconstruction metrics of a replacement at one attention block, accumulated over streamed tokens in float64.

FVU = Σ||y − ŷ||² / Σ||y − ȳ||² (docs/method.md §4), with ȳ the mean target over all counted tokens. The denominator
is accumulated with Chan's parallel update of the mean and the summed squared deviations, so it is exact in
float64 however many batches are streamed and however large the mean is against the spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from ..splicing import LorsaSplicedAttention
from .data import position_mask
from .replacements import attention_hooks, run_replacement

FREQUENCY_BINS = 40
"""Bins of the log10 head activation frequency histogram, between log10(1 / n_tokens) and 0."""


@dataclass
class ReconstructionAccumulator:
    """Streaming sums for the reconstruction metrics of one layer; `update` per batch, `compute` at the end.

    Targets and predictions are [N, d] rows of counted tokens; activations (optional, for a Lorsa) are the
    selected head indices and values [N, K].
    """

    hidden_size: int
    n_heads: int | None = None
    n_tokens: int = 0
    sum_squared_error: float = 0.0
    target_mean: torch.Tensor | None = None
    target_sum_squared_deviation: float = 0.0
    sum_cosine: float = 0.0
    sum_norm_ratio: float = 0.0
    sum_target_norm: float = 0.0
    sum_prediction_norm: float = 0.0
    sum_l0: float = 0.0
    head_counts: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.target_mean = torch.zeros(self.hidden_size, dtype=torch.float64)
        if self.n_heads is not None:
            self.head_counts = torch.zeros(self.n_heads, dtype=torch.int64)

    @torch.no_grad()
    def update(
        self,
        target: torch.Tensor,
        prediction: torch.Tensor,
        top_k_indices: torch.Tensor | None = None,
        top_k_values: torch.Tensor | None = None,
    ) -> None:
        n = target.shape[0]
        if n == 0:
            return
        y = target.detach().to("cpu", torch.float64)
        y_hat = prediction.detach().to("cpu", torch.float64)
        self.sum_squared_error += (y - y_hat).pow(2).sum().item()

        batch_mean = y.mean(0)
        batch_deviation = (y - batch_mean).pow(2).sum().item()
        total = self.n_tokens + n
        delta = batch_mean - self.target_mean
        self.target_sum_squared_deviation += batch_deviation + delta.pow(2).sum().item() * self.n_tokens * n / total
        self.target_mean += delta * (n / total)
        self.n_tokens = total

        y_norm, y_hat_norm = y.norm(dim=-1), y_hat.norm(dim=-1)
        self.sum_cosine += torch.nn.functional.cosine_similarity(y, y_hat, dim=-1, eps=1e-12).sum().item()
        self.sum_norm_ratio += (y_hat_norm / y_norm.clamp_min(1e-12)).sum().item()
        self.sum_target_norm += y_norm.sum().item()
        self.sum_prediction_norm += y_hat_norm.sum().item()

        if top_k_indices is not None and top_k_values is not None and self.head_counts is not None:
            active = top_k_values.detach().cpu() != 0
            self.sum_l0 += active.sum().item()
            indices = top_k_indices.detach().cpu()[active]
            self.head_counts += torch.bincount(indices, minlength=self.n_heads)

    def compute(self) -> dict[str, Any]:
        """The metrics as plain Python numbers (JSON-ready)."""
        if self.n_tokens == 0:
            raise ValueError("No tokens were accumulated: every position was excluded or no batch was given.")
        n, d = self.n_tokens, self.hidden_size
        spread = self.target_sum_squared_deviation
        fvu = self.sum_squared_error / spread if spread > 0 else math.nan
        metrics: dict[str, Any] = {
            "n_tokens": n,
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sum_squared_error / (n * d),
            "cosine_similarity": self.sum_cosine / n,
            "relative_norm": self.sum_norm_ratio / n,
            "mean_target_norm": self.sum_target_norm / n,
            "mean_prediction_norm": self.sum_prediction_norm / n,
        }
        if self.head_counts is not None:
            frequency = self.head_counts.double() / n
            metrics.update(
                l0=self.sum_l0 / n,
                dead_fraction=(self.head_counts == 0).double().mean().item(),
                dead_heads=int((self.head_counts == 0).sum().item()),
                n_heads=self.n_heads,
                frequency_histogram=frequency_histogram(frequency, n),
            )
        return metrics

    def head_frequencies(self) -> torch.Tensor | None:
        """Per-head activation frequency over the counted tokens [n_heads] (None without activations)."""
        return None if self.head_counts is None else self.head_counts.double() / max(self.n_tokens, 1)


def frequency_histogram(frequency: torch.Tensor, n_tokens: int, bins: int = FREQUENCY_BINS) -> dict[str, Any]:
    """Histogram of log10 activation frequency of the heads that fired; dead heads are counted apart."""
    low = math.log10(1.0 / n_tokens)
    edges = torch.linspace(low, 0.0, bins + 1, dtype=torch.float64)
    alive = frequency[frequency > 0]
    counts = torch.histc(alive.log10(), bins=bins, min=low, max=0.0) if alive.numel() else torch.zeros(bins)
    return {
        "log10_frequency_edges": [round(e, 6) for e in edges.tolist()],
        "counts": [int(c) for c in counts.tolist()],
        "dead": int((frequency == 0).sum().item()),
    }


def _n_heads(replacement: nn.Module) -> int | None:
    """Lorsa heads of a spliced-Lorsa replacement (None for any other module: no activations to count)."""
    return replacement.lorsa.config.n_ov_heads if isinstance(replacement, LorsaSplicedAttention) else None


@torch.no_grad()
def reconstruction_metrics(
    model: PreTrainedModel,
    replacements: Mapping[int, nn.Module],
    batches: Iterable[torch.Tensor],
    exclude_token_ids: Sequence[int] = (),
    progress: bool = False,
) -> dict[int, ReconstructionAccumulator]:
    """Run the clean model on `batches` of input ids [B, T] and compare, at each layer, the attention block's
    output with what its replacement predicts from the same input (each layer sees clean inputs).

    Returns one filled accumulator per layer; `.compute()` gives the numbers, `.head_frequencies()` the
    per-head activation frequencies of a Lorsa.
    """
    layers = sorted(replacements)
    config = model.config
    accumulators = {
        layer: ReconstructionAccumulator(config.hidden_size, _n_heads(replacements[layer])) for layer in layers
    }
    state: dict[str, torch.Tensor] = {}

    def hook(layer: int, args: tuple, kwargs: dict, output: Any) -> None:
        prediction, lorsa_output = run_replacement(replacements[layer], args, kwargs)
        mask = state["mask"].to(prediction.device)
        target = output[0] if isinstance(output, tuple) else output
        indices = values = None
        if lorsa_output is not None:
            indices, values = lorsa_output.top_k_indices[mask], lorsa_output.top_k_values[mask]
        accumulators[layer].update(target[mask], prediction[mask], indices, values)

    device = next(model.parameters()).device
    with attention_hooks(model, layers, hook):
        for input_ids in tqdm(list(batches), desc="reconstruction", disable=not progress, leave=False):
            state["mask"] = position_mask(input_ids, exclude_token_ids)
            model(input_ids=input_ids.to(device), use_cache=False)
    return accumulators


__all__ = ["FREQUENCY_BINS", "ReconstructionAccumulator", "frequency_histogram", "reconstruction_metrics"]
