"""The token sequences the head detectors run on: random tokens, repeated random tokens, ordered sequences."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

ORDERED_FAMILIES: dict[str, list[str]] = {
    "numbers": [str(n) for n in range(1, 31)],
    "days": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "months": [
        "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
        "November", "December",
    ],
    "letters": [chr(c) for c in range(ord("A"), ord("Z") + 1)],
}


@dataclass
class ProbeSequences:
    """Token ids [B, T] per probe, each row starting with BOS.

    random: distinct random tokens. repeated: a block of `half` distinct random tokens, then the same block
    again (positions 1..half and half+1..2*half). ordered: runs of consecutive items of ordered families
    (numbers, days, months, letters), one token each, padded on the right (mask in `ordered_mask`).
    """

    random: torch.Tensor
    repeated: torch.Tensor
    half: int
    ordered: torch.Tensor | None
    ordered_mask: torch.Tensor | None


def _distinct_rows(vocab: torch.Tensor, n: int, length: int, generator: torch.Generator) -> torch.Tensor:
    if len(vocab) < length:
        raise ValueError(
            f"The probes need at least {length} distinct ordinary tokens; the vocabulary has {len(vocab)}: "
            "pass a smaller length."
        )
    return torch.stack([vocab[torch.randperm(len(vocab), generator=generator)[:length]] for _ in range(n)])


def probe_sequences(
    vocab: Sequence[int] | torch.Tensor, bos: int, families: Sequence[Sequence[int]] = (), n: int = 16,
    length: int = 32, seed: int = 0,
) -> ProbeSequences:
    """Probe sequences over the ordinary token ids `vocab`; `families` are runs of token ids in order."""
    generator = torch.Generator().manual_seed(seed)
    vocab = torch.as_tensor(list(vocab) if not isinstance(vocab, torch.Tensor) else vocab, dtype=torch.long)
    start = torch.full((n, 1), bos, dtype=torch.long)
    random = torch.cat((start, _distinct_rows(vocab, n, length, generator)), 1)
    half = length // 2
    block = _distinct_rows(vocab, n, half, generator)
    repeated = torch.cat((start, block, block), 1)
    runs = [list(run) for run in families if len(run) >= 3]
    if not runs:
        return ProbeSequences(random, repeated, half, None, None)
    width = 1 + max(len(run) for run in runs)
    ordered = torch.full((len(runs), width), bos, dtype=torch.long)
    mask = torch.zeros(len(runs), width, dtype=torch.long)
    for index, run in enumerate(runs):
        ordered[index, : len(run) + 1] = torch.tensor([bos, *run])
        mask[index, : len(run) + 1] = 1
    return ProbeSequences(random, repeated, half, ordered, mask)


def tokenizer_families(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The ordered families as runs of single tokens (" Monday", " 3", ...): every maximal run of at least three
    consecutive items that the tokenizer writes as one token each."""
    runs = []
    for items in ORDERED_FAMILIES.values():
        run: list[int] = []
        for item in items:
            ids = tokenizer(" " + item, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                run.append(ids[0])
                continue
            runs.append(run)
            run = []
        runs.append(run)
    return [run for run in runs if len(run) >= 3]


def ordinary_tokens(tokenizer: PreTrainedTokenizerBase, limit: int | None = None) -> torch.Tensor:
    """Token ids that are not special tokens (the first `limit` of them)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    return torch.tensor(ids[:limit] if limit else ids, dtype=torch.long)


__all__ = ["ORDERED_FAMILIES", "ProbeSequences", "ordinary_tokens", "probe_sequences", "tokenizer_families"]
