"""What a pass over a corpus keeps about every Lorsa head of one layer, in memory bounded by the number of heads.

Per head: the `top_n` strongest activations (strength |a|, ties broken by row then position, so the result does
not depend on batching), a uniform sample of `sample_size` of its activations (from which the weakly active
contexts are drawn), how often it fires and the sum of its activations. The token ids of every row an entry
points at are kept with it, and nothing else. Stores save to one safetensors file, resume, and merge exactly:
two stores over disjoint rows merge into the store of a single pass over both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_write_path
from .ranking import EMPTY_ROW, RankedTable, sample_keys

FORMAT_VERSION = 1


@dataclass
class Context:
    """One activation of one head: the row's token ids, the position in it and the activation there."""

    head: int
    row: int
    position: int
    activation: float
    token_ids: list[int]


@dataclass
class HeadActivationStore:
    """Top activations, a sample, frequencies and sums for the `n_heads` heads of one Lorsa layer.

    Build one with `HeadActivationStore.create`, feed it with `update`, read it with `top_contexts`,
    `weak_contexts`, `frequency` and `mean_activation`.
    """

    layer: int
    top: RankedTable
    sample: RankedTable
    n_active: torch.Tensor
    activation_sum: torch.Tensor
    n_tokens: int = 0
    rows: dict[int, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    _referenced_rows: int = field(default=0, repr=False)

    @classmethod
    def create(cls, n_heads: int, layer: int, top_n: int = 16, sample_size: int = 32) -> HeadActivationStore:
        """An empty store; `top_n` and `sample_size` are per head."""
        if top_n <= 0:
            raise ValueError(f"top_n must be a positive number of contexts per head, got {top_n}.")
        if sample_size < 0:
            raise ValueError(f"sample_size must be zero or more contexts per head, got {sample_size}.")
        return cls(
            layer=layer, top=RankedTable.empty(n_heads, top_n), sample=RankedTable.empty(n_heads, sample_size),
            n_active=torch.zeros(n_heads, dtype=torch.int64), activation_sum=torch.zeros(n_heads, dtype=torch.float64),
        )

    @property
    def n_heads(self) -> int:
        return self.n_active.shape[0]

    @property
    def top_n(self) -> int:
        return self.top.size

    @torch.no_grad()
    def update(
        self, token_ids: torch.Tensor, row_ids: torch.Tensor, counted: torch.Tensor,
        top_k_values: torch.Tensor, top_k_indices: torch.Tensor,
    ) -> None:
        """Take in one batch: token_ids [B, T], row_ids [B] (distinct across the whole corpus), counted [B, T]
        (positions that count: not padding, not BOS), and the layer's kept activations and heads [B, T, K]."""
        by_row = torch.argsort(row_ids.cpu())  # entries then come in (row, position) order: one sort fewer
        token_ids, row_ids, counted = token_ids[by_row], row_ids.cpu()[by_row], counted.cpu()[by_row]
        top_k_values, top_k_indices = top_k_values.cpu()[by_row], top_k_indices.cpu()[by_row]
        counted = counted.bool()
        batch_size = token_ids.shape[0]
        values = top_k_values.detach().double()
        active = (values != 0) & counted[..., None]
        b, t, slot = active.nonzero(as_tuple=True)
        head = top_k_indices.detach()[b, t, slot].long()
        value = values[b, t, slot]
        row = row_ids.cpu().long()[b]
        self.n_tokens += int(counted.sum())
        self.n_active += torch.bincount(head, minlength=self.n_heads)
        self.activation_sum.index_add_(0, head, value)
        self.top = self.top.updated(head, value.abs(), row, t, value)
        if self.sample.size:
            keys = sample_keys(head, row, t).double()
            self.sample = self.sample.updated(head, -keys, row, t, value)
        for index, row_id in enumerate(row_ids.tolist()):
            self.rows[int(row_id)] = token_ids[index].detach().cpu().to(torch.int64).clone()
        if len(self.rows) > 2 * self._referenced_rows + 16 * batch_size:
            self._drop_unreferenced_rows()

    def _drop_unreferenced_rows(self) -> None:
        """Forget the rows no entry points at (run now and then: rows are small, the check is not free)."""
        referenced = set(torch.cat((self.top.row.flatten(), self.sample.row.flatten())).unique().tolist())
        for row_id in [r for r in self.rows if r not in referenced]:
            del self.rows[row_id]
        self._referenced_rows = len(self.rows)

    def merge(self, other: HeadActivationStore) -> HeadActivationStore:
        """The store of one pass over both stores' rows (which must be disjoint)."""
        if (other.layer, other.n_heads, other.top.size, other.sample.size) != (
            self.layer, self.n_heads, self.top.size, self.sample.size
        ):
            raise ValueError(
                "Only stores of the same layer, heads, top_n and sample_size merge: got layer/heads/top_n/sample "
                f"{self.layer}/{self.n_heads}/{self.top.size}/{self.sample.size} and "
                f"{other.layer}/{other.n_heads}/{other.top.size}/{other.sample.size}."
            )
        shared = set(self.rows) & set(other.rows)
        if shared:
            raise ValueError(
                f"Both stores hold rows {sorted(shared)[:5]}: they analysed the same rows, and merging would count "
                "them twice. Give each run or process its own rows (row_offset, or rank and world_size)."
            )
        merged = HeadActivationStore(
            layer=self.layer, top=self.top.merged(other.top), sample=self.sample.merged(other.sample),
            n_active=self.n_active + other.n_active, activation_sum=self.activation_sum + other.activation_sum,
            n_tokens=self.n_tokens + other.n_tokens, rows={**self.rows, **other.rows},
            metadata={**other.metadata, **self.metadata},
        )
        merged._drop_unreferenced_rows()
        return merged

    def frequency(self) -> torch.Tensor:
        """[H] fraction of counted tokens at which each head fires."""
        return self.n_active.double() / max(self.n_tokens, 1)

    def mean_activation(self) -> torch.Tensor:
        """[H] mean activation of each head where it fires (0 for a head that never fired)."""
        return self.activation_sum / self.n_active.clamp(min=1).double()

    def _contexts(self, table: RankedTable, head: int) -> list[Context]:
        return [
            Context(head, int(row), int(position), float(value), self.rows[int(row)].tolist())
            for row, position, value in zip(
                table.row[head].tolist(), table.position[head].tolist(), table.value[head].tolist(), strict=True
            )
            if row != EMPTY_ROW
        ]

    def top_contexts(self, head: int) -> list[Context]:
        """The head's strongest activations, strongest first."""
        return self._contexts(self.top, head)

    def sampled_contexts(self, head: int) -> list[Context]:
        """The head's uniform sample of activations, in sample order."""
        return self._contexts(self.sample, head)

    def weak_contexts(self, head: int, fraction: float = 0.5, limit: int | None = None) -> list[Context]:
        """Sampled activations weaker than `fraction` of the head's strongest one, in sample order (uniform among
        the head's weak activations)."""
        strongest = float(self.top.primary[head, 0])
        weak = [c for c in self.sampled_contexts(head) if abs(c.activation) < fraction * strongest]
        return weak[:limit]

    def state(self) -> dict[str, Any]:
        """Every tensor and number of the store (what `save` writes and processes exchange)."""
        self._drop_unreferenced_rows()
        row_ids = sorted(self.rows)
        width = max((self.rows[r].numel() for r in row_ids), default=0)
        row_tokens = torch.full((len(row_ids), width), -1, dtype=torch.int64)
        for index, row_id in enumerate(row_ids):
            row_tokens[index, : self.rows[row_id].numel()] = self.rows[row_id]
        tensors = {
            **self.top.tensors("top"), **self.sample.tensors("sample"), "n_active": self.n_active,
            "activation_sum": self.activation_sum, "row_ids": torch.tensor(row_ids, dtype=torch.int64),
            "row_tokens": row_tokens,
        }
        header = {"format": FORMAT_VERSION, "layer": self.layer, "n_tokens": self.n_tokens, "metadata": self.metadata}
        return {"tensors": tensors, "header": header}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> HeadActivationStore:
        tensors, header = state["tensors"], state["header"]
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"Unknown store format {header.get('format')!r}; this lorsa_hf reads {FORMAT_VERSION}.")
        rows = {}
        for row_id, tokens in zip(tensors["row_ids"].tolist(), tensors["row_tokens"], strict=True):
            rows[int(row_id)] = tokens[tokens >= 0].clone()
        return cls(
            layer=int(header["layer"]), top=RankedTable.from_tensors(tensors, "top"),
            sample=RankedTable.from_tensors(tensors, "sample"), n_active=tensors["n_active"],
            activation_sum=tensors["activation_sum"], n_tokens=int(header["n_tokens"]), rows=rows,
            metadata=dict(header.get("metadata", {})),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write the store to one safetensors file, atomically (a killed save leaves the previous file)."""
        state = self.state()
        metadata = {"lorsa_hf_store": json.dumps(state["header"])}
        with atomic_write_path(path) as staging:
            save_file(state["tensors"], staging, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> HeadActivationStore:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            header = (handle.metadata() or {}).get("lorsa_hf_store")
        if header is None:
            raise ValueError(f"{path} is not a lorsa_hf activation store (no 'lorsa_hf_store' metadata).")
        return cls.from_state({"tensors": load_file(str(path)), "header": json.loads(header)})


__all__ = ["Context", "HeadActivationStore"]
