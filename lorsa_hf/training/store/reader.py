"""Reading an activation store: every shard is verified when first read (size, sha256, tensor names, shapes and
dtypes against the manifest), and the stored activations are found by the rows they belong to.

`ActivationStore.activations(...)` is a drop-in for the live `ActivationSource`: called with rows of token ids
and their attention mask, it returns those rows' stored activations, and refuses rows the store does not
hold, so a store can never silently feed activations of other text.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load

from ..activations import LayerActivations
from ..data import PackerState
from ..recipe import Recipe
from .layout import (
    ROW_DTYPE,
    SHARD_METADATA,
    SPLITS,
    STORE_DTYPES,
    StoreError,
    activation_name,
    fingerprint_differences,
    read_manifest,
    store_dtype,
)

Location = tuple[str, int, int]
"""(split, shard index, row in the shard)."""


def row_key(ids: torch.Tensor, attention: torch.Tensor) -> bytes:
    """A digest of one row's token ids and mask, by which the store finds it."""
    data = ids.to(ROW_DTYPE).contiguous().numpy().tobytes() + attention.to(ROW_DTYPE).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


def _shard_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file held in memory."""
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]).get("__metadata__", {})


class ActivationStore:
    """A built activation store (see `layout` for what it holds)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.layers: list[int] = self.manifest["layers"]
        self.context_length: int = self.manifest["data"]["context_length"]
        self._cache: dict[str, tuple[int, dict[str, torch.Tensor], list[PackerState]]] = {}
        self._index: dict[bytes, set[Location]] | None = None

    def split(self, name: str) -> dict[str, Any]:
        return self.manifest["splits"][name]

    def batch_count(self, name: str) -> int:
        return sum(shard["batches"] for shard in self.split(name)["shards"])

    # ------------------------------------------------------------------------------------------- checks

    def check(self, recipe: Recipe) -> None:
        """Refuse a recipe this store cannot train, naming every key that does not match."""
        manifest, problems = self.manifest, fingerprint_differences(self.manifest, recipe)
        missing = [layer for layer in recipe.lorsa.layers if layer not in self.layers]
        if missing:
            problems.append(f"lorsa.layers {missing} are not stored (the store has {self.layers})")
        if manifest["dtype"] != store_dtype(recipe):
            problems.append(f"store.dtype: store {manifest['dtype']!r}, recipe {store_dtype(recipe)!r}")
        if not manifest["complete"]:
            problems.append("the store is not finished (run `lorsa-hf store` with this recipe to finish it)")
        needs = {
            "train": (recipe.total_steps, "training.total_tokens / max_steps"),
            "heldout": (math.ceil(recipe.training.eval_sequences / recipe.data.batch_size), "training.eval_sequences"),
        }
        for name, (batches, key) in needs.items():
            if self.batch_count(name) < batches and not self.split(name)["exhausted"]:
                problems.append(f"{key} needs {batches} {name} batches, the store holds {self.batch_count(name)}")
        init = recipe.init
        rows = self.split("calibration")["rows_per_batch"]
        if (init.b_o == "mean" or init.match_norm) and rows != init.calibration_sequences:
            problems.append(f"init.calibration_sequences: store {rows}, recipe {init.calibration_sequences}")
        if problems:
            raise StoreError(
                f"The activation store {self.folder} does not match the recipe: {'; '.join(problems)}. Build a "
                "store for this recipe (`lorsa-hf store RECIPE store.path=NEW_FOLDER`) or match the store's settings."
            )

    def _verified(self, split: str, index: int) -> tuple[dict[str, torch.Tensor], list[PackerState]]:
        """Shard `index` of `split`, read once and checked against the manifest; its packer states per batch."""
        entry = self.split(split)["shards"][index]
        path = self.folder / entry["file"]
        rebuild = "delete the store and rebuild it with `lorsa-hf store`"
        if not path.is_file():
            raise StoreError(f"Shard {entry['file']} of the activation store {self.folder} is missing: {rebuild}.")
        data = path.read_bytes()
        if len(data) != entry["bytes"]:
            raise StoreError(
                f"Shard {entry['file']} of the activation store {self.folder} is truncated or altered: "
                f"{len(data)} bytes, the manifest says {entry['bytes']}; {rebuild}."
            )
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(
                f"Shard {entry['file']} of the activation store {self.folder} is corrupt: its sha256 differs from "
                f"the manifest's; {rebuild}."
            )
        tensors = load(data)
        rows, T, d = entry["rows"], self.context_length, self.manifest["hidden_size"]
        expected = {"input_ids": ((rows, T), ROW_DTYPE), "attention_mask": ((rows, T), ROW_DTYPE)}
        for layer in self.layers:
            for kind in ("inputs", "outputs"):
                expected[activation_name(layer, kind)] = ((rows, T, d), STORE_DTYPES[self.manifest["dtype"]])
        found = {name: (tuple(t.shape), t.dtype) for name, t in sorted(tensors.items())}
        if found != expected:
            raise StoreError(
                f"Shard {entry['file']} of the activation store {self.folder} holds {found}, the manifest "
                f"describes {expected}; {rebuild}."
            )
        states = [PackerState.from_dict(s) for s in json.loads(_shard_metadata(data)[SHARD_METADATA])["states"]]
        return tensors, states

    def shard(self, split: str, index: int) -> tuple[dict[str, torch.Tensor], list[PackerState]]:
        """A verified shard; the last one read of each split stays in memory."""
        cached = self._cache.get(split)
        if cached is None or cached[0] != index:
            self._cache[split] = (index, *self._verified(split, index))
        return self._cache[split][1], self._cache[split][2]

    # ------------------------------------------------------------------------------------------- reading

    def batches(
        self, split: str, start: int = 0, count: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, PackerState]]:
        """The forward batches of `split` from batch `start` on: ids, attention mask, packer state after it."""
        rows_per_batch = self.split(split)["rows_per_batch"]
        end = self.batch_count(split) if count is None else min(start + count, self.batch_count(split))
        for index, entry in enumerate(self.split(split)["shards"]):
            first, last = entry["first_batch"], entry["first_batch"] + entry["batches"]
            if last <= start or first >= end:
                continue
            tensors, states = self.shard(split, index)
            for batch in range(max(start, first), min(end, last)):
                rows = slice((batch - first) * rows_per_batch, (batch - first + 1) * rows_per_batch)
                yield tensors["input_ids"][rows].clone(), tensors["attention_mask"][rows].clone(), states[batch - first]

    def _row_index(self) -> dict[bytes, set[Location]]:
        """Row digest -> where that row is stored, built from the shards' token ids on first use."""
        if self._index is None:
            index: dict[bytes, set[Location]] = {}
            for split in SPLITS:
                for number, entry in enumerate(self.split(split)["shards"]):
                    path = self.folder / entry["file"]
                    if not path.is_file():
                        raise StoreError(f"Shard {entry['file']} of the activation store {self.folder} is missing.")
                    with safe_open(str(path), framework="pt") as handle:
                        ids, attention = handle.get_tensor("input_ids"), handle.get_tensor("attention_mask")
                    for row in range(ids.shape[0]):
                        index.setdefault(row_key(ids[row], attention[row]), set()).add((split, number, row))
            self._index = index
        return self._index

    def locate(self, ids: torch.Tensor, attention: torch.Tensor, prefer: str = "train") -> Location:
        """Where the consecutive rows `ids` start in the store, looking in `prefer` first."""
        index = self._row_index()
        keys = [row_key(ids[i].cpu(), attention[i].cpu()) for i in range(ids.shape[0])]
        order = [prefer] + [s for s in SPLITS if s != prefer]
        for split, number, row in sorted(index.get(keys[0], ()), key=lambda loc: (order.index(loc[0]), loc[1:])):
            if all((split, number, row + i) in index.get(key, ()) for i, key in enumerate(keys)):
                return split, number, row
        raise StoreError(
            f"These rows are not in the activation store {self.folder}: the store was built from other text or "
            "other data settings. Build a store for this recipe with `lorsa-hf store`."
        )

    def activations(
        self, layers: list[int], device: torch.device | str = "cpu", prefer: str = "train"
    ) -> StoredActivations:
        return StoredActivations(self, layers, device, prefer)


class StoredActivations:
    """What `ActivationSource` returns for a batch of rows, read from a store (float32, on `device`)."""

    def __init__(self, store: ActivationStore, layers: list[int], device: torch.device | str, prefer: str) -> None:
        missing = [layer for layer in layers if layer not in store.layers]
        if missing:
            raise StoreError(f"Layers {missing} are not in the activation store {store.folder} ({store.layers}).")
        self.store, self.layers, self.device, self.prefer = store, sorted(layers), device, prefer

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, LayerActivations]:
        split, number, row = self.store.locate(input_ids, attention_mask, self.prefer)
        tensors, _ = self.store.shard(split, number)
        rows = slice(row, row + input_ids.shape[0])
        if not (torch.equal(tensors["input_ids"][rows], input_ids.cpu().to(ROW_DTYPE))
                and torch.equal(tensors["attention_mask"][rows], attention_mask.cpu().to(ROW_DTYPE))):
            raise StoreError(f"The activation store {self.store.folder} holds other rows than its index says.")

        def read(layer: int, kind: str) -> torch.Tensor:
            stored = tensors[activation_name(layer, kind)][rows]
            return stored.to(device=self.device, dtype=torch.float32, copy=True)

        return {layer: LayerActivations(read(layer, "inputs"), read(layer, "outputs")) for layer in self.layers}


__all__ = ["ActivationStore", "StoredActivations", "row_key"]
