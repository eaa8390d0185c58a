"""Per-head tables of the best entries under one total order, updated from a batch and merged exactly.

An entry is (head, primary, row, position, value). Entries of a head are ordered by `primary` descending,
then row ascending, then position ascending: a total order, because a head meets each (row, position) once.
Keeping the first `size` entries of every head under that order gives the same table whatever the batches,
their order or the merges, so a streamed run equals a brute-force search and runs merge exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY_ROW = torch.iinfo(torch.int64).max


@dataclass
class RankedTable:
    """The first `size` entries of each of `n_heads` heads; empty slots have primary -inf and row EMPTY_ROW.

    primary [H, size] float64; row, position [H, size] int64; value [H, size] float64 (the signed activation).
    """

    primary: torch.Tensor
    row: torch.Tensor
    position: torch.Tensor
    value: torch.Tensor

    @classmethod
    def empty(cls, n_heads: int, size: int) -> RankedTable:
        return cls(
            primary=torch.full((n_heads, size), -torch.inf, dtype=torch.float64),
            row=torch.full((n_heads, size), EMPTY_ROW, dtype=torch.int64),
            position=torch.zeros(n_heads, size, dtype=torch.int64),
            value=torch.zeros(n_heads, size, dtype=torch.float64),
        )

    @property
    def size(self) -> int:
        return self.primary.shape[1]

    def filled(self) -> torch.Tensor:
        """[H, size] bool: slots holding an entry."""
        return self.row != EMPTY_ROW

    def threshold(self) -> torch.Tensor:
        """[H] the primary of each head's last kept entry (-inf while a head's table is not full): an entry
        below it can never enter."""
        return self.primary[:, -1]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        names = ("primary", "row", "position", "value")
        return {f"{prefix}.{name}": getattr(self, name).contiguous() for name in names}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> RankedTable:
        return cls(*(tensors[f"{prefix}.{name}"] for name in ("primary", "row", "position", "value")))

    def merged(self, other: RankedTable) -> RankedTable:
        """The first `size` entries of each head among both tables' entries."""
        return _first_per_row(
            torch.cat((self.primary, other.primary), 1), torch.cat((self.row, other.row), 1),
            torch.cat((self.position, other.position), 1), torch.cat((self.value, other.value), 1), self.size,
        )

    def updated(
        self, head: torch.Tensor, primary: torch.Tensor, row: torch.Tensor, position: torch.Tensor, value: torch.Tensor
    ) -> RankedTable:
        """This table (changed in place) with a batch of entries (1-D tensors of equal length) taken into account.

        Only entries that reach a head's threshold are sorted, and only the heads they belong to are merged:
        once the tables have filled, a batch touches few of them. Entries given in (row, position) order need
        one sort fewer; any order gives the same table."""
        head, primary = head.long(), primary.double()
        keep = (primary >= self.threshold()[head]).nonzero().flatten()
        if keep.numel() == 0:
            return self
        head, primary, row, position, value = (t.index_select(0, keep) for t in (head, primary, row, position, value))
        order = _entry_order(primary, row, position)
        order = order[torch.sort(head[order], stable=True).indices]
        head, primary, row, position, value = (t[order] for t in (head, primary, row, position, value))
        counts = torch.bincount(head, minlength=self.primary.shape[0])
        rank = torch.arange(head.numel()) - (torch.cumsum(counts, 0) - counts)[head]
        kept = (rank < self.size).nonzero().flatten()
        touched = counts.nonzero().flatten()
        slot = torch.full_like(counts, -1)
        slot[touched] = torch.arange(touched.numel())
        batch = RankedTable.empty(touched.numel(), self.size)
        index = (slot[head[kept]], rank[kept])
        batch.primary[index] = primary[kept]
        batch.row[index] = row[kept].long()
        batch.position[index] = position[kept].long()
        batch.value[index] = value[kept].double()
        merged = self.rows_of(touched).merged(batch)
        for name in ("primary", "row", "position", "value"):
            getattr(self, name)[touched] = getattr(merged, name)
        return self

    def rows_of(self, heads: torch.Tensor) -> RankedTable:
        """The sub-table of `heads`."""
        return RankedTable(self.primary[heads], self.row[heads], self.position[heads], self.value[heads])


def _entry_order(primary: torch.Tensor, row: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Indices that sort entries by primary descending, row ascending, position ascending (last dim)."""
    if row.dim() == 1 and _ascending(row, position):
        return torch.sort(primary, descending=True, stable=True).indices
    order = torch.sort(position, dim=-1, stable=True).indices
    order = order.gather(-1, torch.sort(row.gather(-1, order), dim=-1, stable=True).indices)
    return order.gather(-1, torch.sort(primary.gather(-1, order), dim=-1, descending=True, stable=True).indices)


def _ascending(row: torch.Tensor, position: torch.Tensor) -> bool:
    """Whether 1-D entries already come in (row, position) order."""
    if row.numel() < 2:
        return True
    row_step, position_step = row[1:] - row[:-1], position[1:] - position[:-1]
    return bool(((row_step > 0) | ((row_step == 0) & (position_step >= 0))).all())


def _first_per_row(
    primary: torch.Tensor, row: torch.Tensor, position: torch.Tensor, value: torch.Tensor, size: int
) -> RankedTable:
    order = _entry_order(primary, row, position)[:, :size]
    return RankedTable(*(t.gather(1, order) for t in (primary, row, position, value)))


_MODULUS = 2**31 - 1


def sample_keys(head: torch.Tensor, row: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """A pseudo-random key in [0, 2^31 - 1) for each (head, row, position), the same in every run and process:
    keeping the entries with the smallest keys gives a uniform sample that merges exactly."""
    x = (row.long() % _MODULUS * 1_000_003 + position.long() + head.long() * 69_621) % _MODULUS
    for multiplier in (48271, 16807):
        x = (x * multiplier + 12_345) % _MODULUS
        x ^= x >> 11
    return x


__all__ = ["EMPTY_ROW", "RankedTable", "sample_keys"]
