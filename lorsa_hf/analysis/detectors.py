"""Head detectors: a score in [0, 1] per head for five known jobs, for Lorsa heads and base-model heads alike.

Attention jobs score the attention a head's QK group pays, at a query, to the key the job names, averaged over
the queries weighted by the strength of the head's output there (so a Lorsa head counts where it fires):
- previous_token (random tokens): the key just before the query (queries from position 2 on);
- attention_sink (random tokens): the BOS at position 0;
- duplicate_token (a random block repeated): in the second copy, the earlier occurrence of the query's token;
- induction (the same): the token after that earlier occurrence, times how much the head then promotes the
  next token.
Promotion jobs average the standardized logit lift of the expected token (`Unembedding.standardized`, in
standard deviations over the vocabulary) and map it linearly to [0, 1]: 0 for no lift on average (or a fall),
1 from a lift of `FULL_LIFT` standard deviations on:
- successor (runs of ordered items: numbers, days, months, letters): the next item.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .probes import ProbeSequences
from .readings import HeadReadings

DETECTORS = ("induction", "previous_token", "attention_sink", "duplicate_token", "successor")

FULL_LIFT = 3.0

ReadingsOf = Callable[[torch.Tensor, torch.Tensor], HeadReadings]
"""(input ids [B, T], attention mask [B, T]) -> the readings of every head of one layer on them."""


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[B, G, T, g] values and weights -> [G * g] weighted mean over batch and positions (0 with no weight)."""
    total = weight.sum((0, 2))
    mean = (values * weight).sum((0, 2)) / total.clamp(min=1e-300)
    return torch.where(total > 0, mean, torch.zeros_like(mean)).flatten()


def key_share(readings: HeadReadings, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[H]: the strength-weighted mean attention to key targets[b, s] at the queries (boolean [B, T])."""
    pattern = readings.pattern
    batch_size, groups, seq_len, _ = pattern.shape
    index = targets.clamp(min=0).long()[:, None, :, None].expand(batch_size, groups, seq_len, 1)
    attended = pattern.gather(-1, index).expand_as(readings.strength)
    return _weighted_mean(attended, readings.strength * queries[:, None, :, None])


def promotion_score(readings: HeadReadings, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[H] in [0, 1]: how consistently each head's output at the queries lifts the logit of tokens[b, s]."""
    lift = readings.promotion(tokens)
    mean = _weighted_mean(lift, readings.strength * queries[:, None, :, None])
    return (mean / FULL_LIFT).clamp(0.0, 1.0)


def _positions(shape: tuple[int, int]) -> torch.Tensor:
    return torch.arange(shape[1]).expand(shape)


def score_heads(readings_of: ReadingsOf, probes: ProbeSequences) -> dict[str, torch.Tensor]:
    """Every detector's score [H] for every head of one layer."""
    random, repeated, half = probes.random, probes.repeated, probes.half
    on_random = readings_of(random, torch.ones_like(random))
    position = _positions(random.shape)
    scores = {
        "previous_token": key_share(on_random, position >= 2, position - 1),
        "attention_sink": key_share(on_random, position >= 1, torch.zeros_like(position)),
    }
    on_repeated = readings_of(repeated, torch.ones_like(repeated))
    position = _positions(repeated.shape)
    second = position > half
    scores["duplicate_token"] = key_share(on_repeated, second, position - half)
    has_next = second & (position < repeated.shape[1] - 1)
    following = torch.cat((repeated[:, 1:], repeated[:, -1:]), 1)
    attends = key_share(on_repeated, has_next, position - half + 1)
    scores["induction"] = attends * promotion_score(on_repeated, has_next, following)
    if probes.ordered is not None:
        ordered, mask = probes.ordered, probes.ordered_mask
        on_ordered = readings_of(ordered, mask)
        position = _positions(ordered.shape)
        following = torch.cat((ordered[:, 1:], ordered[:, -1:]), 1)
        has_next = (position >= 1) & torch.cat((mask[:, 1:], torch.zeros_like(mask[:, :1])), 1).bool()
        scores["successor"] = promotion_score(on_ordered, has_next, following)
    return {name: scores[name] for name in DETECTORS if name in scores}


__all__ = ["DETECTORS", "FULL_LIFT", "ReadingsOf", "key_share", "promotion_score", "score_heads"]
