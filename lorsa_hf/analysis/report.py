"""The content of a head report: for the heads worth showing, their contexts with the head's activation at every
token and the z-pattern of the activation the context was kept for, their logit effects and detector scores."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..modeling_lorsa import LorsaLayer
from .logits import LogitEffects
from .reading import LayerReader
from .store import Context, HeadActivationStore
from .zpattern import z_pattern

DETECTION_THRESHOLD = 0.5
"""A head counts as doing a detector's job when its score is at least this."""


@dataclass
class ReportOptions:
    """Which heads the report shows (`heads` most frequent, plus the `per_detector` best of each detector) and
    how much of each: `contexts` top and `weak` weakly active contexts per head, `before` / `after` tokens
    around each context's position."""

    heads: int = 128
    per_detector: int = 8
    contexts: int = 8
    weak: int = 4
    before: int = 24
    after: int = 4


def chosen_heads(store: HeadActivationStore, scores: dict[str, torch.Tensor], options: ReportOptions) -> list[int]:
    """The most frequent heads that fired, then the best heads of every detector, without repeats."""
    frequency = store.frequency()
    order = torch.argsort(frequency, descending=True, stable=True)
    heads = [int(h) for h in order[: options.heads] if frequency[h] > 0]
    for values in scores.values():
        best = torch.argsort(values, descending=True, stable=True)[: options.per_detector]
        heads += [int(h) for h in best if values[h] > 0 and int(h) not in heads]
    return heads


def _window(context: Context, options: ReportOptions) -> tuple[int, int]:
    start = max(0, context.position - options.before)
    return start, min(len(context.token_ids), context.position + options.after + 1)


@torch.no_grad()
def context_details(
    model: PreTrainedModel, module: LorsaLayer, contexts: list[tuple[str, Context]], options: ReportOptions,
    batch_size: int = 8,
) -> list[dict[str, Any]]:
    """For each (kind, context): the window's token ids, the head's activation at each of its tokens and the
    z-pattern contributions (from the window's tokens) to the activation at the context's position."""
    reader = LayerReader(model, module)
    by_row: dict[int, list[int]] = defaultdict(list)
    for index, (_, context) in enumerate(contexts):
        by_row[context.row].append(index)
    rows = list(by_row)
    details: list[dict[str, Any]] = [{} for _ in contexts]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        ids = [contexts[by_row[row][0]][1].token_ids for row in chunk]
        width = max(len(tokens) for tokens in ids)
        input_ids = torch.tensor([tokens + [0] * (width - len(tokens)) for tokens in ids])
        mask = torch.tensor([[1] * len(tokens) + [0] * (width - len(tokens)) for tokens in ids])
        read = reader(input_ids, mask)
        pattern = z_pattern(module, read.hidden_states, **read.arguments)
        activations = read.output.activations()
        for batch, row in enumerate(chunk):
            for index in by_row[row]:
                kind, context = contexts[index]
                first, stop = _window(context, options)
                row_contributions = pattern.at(context.head, context.position, batch)
                contributions = row_contributions[first:stop]
                details[index] = {
                    "kind": kind, "row": context.row, "position": context.position, "focus": context.position - first,
                    "activation": context.activation, "tokens": context.token_ids[first:stop],
                    "activations": activations[batch, first:stop, context.head].tolist(),
                    "z": contributions.tolist(),
                    "z_total": float(row_contributions.sum()),
                    "earlier": earlier_contributions(row_contributions, first, context.token_ids),
                }
    return details



def earlier_contributions(
    contributions: torch.Tensor, first: int, token_ids: list[int], fraction: float = 0.05, most: int = 4
) -> list[list[float]]:
    """[position, token id, contribution] of the (at most `most`) tokens before a context's window whose
    contribution to its activation is at least `fraction` of the largest, in order: what the window leaves out."""
    strongest = float(contributions.abs().max()) if len(contributions) else 0.0
    before = contributions[:first].abs()
    order = torch.argsort(before, descending=True, stable=True)[:most]
    kept = sorted(int(t) for t in order if strongest > 0 and before[t] >= fraction * strongest)
    return [[t, token_ids[t], float(contributions[t])] for t in kept]


def _pairs(tokens: torch.Tensor, values: torch.Tensor) -> list[list[float]]:
    return [[int(t), float(v)] for t, v in zip(tokens.tolist(), values.tolist(), strict=True)]


def head_entries(
    model: PreTrainedModel, module: LorsaLayer, store: HeadActivationStore, heads: list[int],
    effects: LogitEffects, scores: dict[str, torch.Tensor], options: ReportOptions, k: int = 8,
) -> list[dict[str, Any]]:
    """One entry per head: statistics, promoted and suppressed tokens, detector scores, contexts."""
    wanted = []
    for head in heads:
        wanted += [("top", c) for c in store.top_contexts(head)[: options.contexts]]
        wanted += [("weak", c) for c in store.weak_contexts(head, limit=options.weak)]
    details = context_details(model, module, wanted, options)
    by_head: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for (_, context), detail in zip(wanted, details, strict=True):
        by_head[context.head].append(detail)
    frequency, mean = store.frequency(), store.mean_activation()
    return [
        {
            "head": head, "group": head // module.config.ov_group_size, "frequency": float(frequency[head]),
            "mean": float(mean[head]), "scores": {name: float(values[head]) for name, values in scores.items()},
            "promoted": _pairs(effects.promoted[head, :k], effects.promoted_logits[head, :k]),
            "suppressed": _pairs(effects.suppressed[head, :k], effects.suppressed_logits[head, :k]),
            "contexts": by_head[head],
        }
        for head in heads
    ]


def detection_counts(scores: dict[str, torch.Tensor], threshold: float = DETECTION_THRESHOLD) -> dict[str, int]:
    """How many heads score at least `threshold` on each detector."""
    return {name: int((values >= threshold).sum()) for name, values in scores.items()}


def token_strings(tokenizer: PreTrainedTokenizerBase, entries: list[dict[str, Any]]) -> dict[str, str]:
    """The text of every token the entries mention, keyed by id."""
    ids = set()
    for entry in entries:
        ids.update(t for t, _ in entry["promoted"] + entry["suppressed"])
        for context in entry["contexts"]:
            ids.update(context["tokens"])
            ids.update(int(token) for _, token, _ in context.get("earlier", []))
    return {str(i): tokenizer.decode([i]) for i in sorted(ids)}


__all__ = [
    "DETECTION_THRESHOLD", "ReportOptions", "chosen_heads", "context_details", "detection_counts",
    "earlier_contributions", "head_entries", "token_strings",
]
