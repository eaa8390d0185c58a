"""What an activation store holds, planned from a recipe: its fingerprint (the recipe keys the activations
depend on), its three splits and their sizes on disk, and the manifest that records it all.

A store has three splits, each the exact sequence of base-model forward batches a live run makes:
`calibration` (one batch of `init.calibration_sequences` rows, what the initialisation calibrates on),
`heldout` (the evaluation batches) and `train` (one batch of `data.batch_size` rows per optimizer step).
Storing the same forward batches, not just the same rows, is what makes training from a store equal a live
run bit for bit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...io import atomic_write_text
from ..recipe import Recipe

FORMAT = "lorsa-hf-activation-store"
VERSION = 1
MANIFEST = "manifest.json"
SHARD_METADATA = "lorsa_hf"
"""The shard metadata key holding its split and the packer state after each of its batches (JSON)."""
SPLITS = ("calibration", "heldout", "train")
STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ROW_DTYPE = torch.int64
"""`input_ids` and `attention_mask` are stored as int64, as the packer makes them."""

# The recipe keys the stored activations depend on; a recipe differing in any of them needs another store.
FINGERPRINT_KEYS = {
    "model": ("name", "revision", "dtype", "attn_implementation"),
    "data": (
        "source", "path", "config_name", "split", "text_field", "files", "heldout_split", "heldout_files",
        "heldout_documents", "context_length", "batch_size", "pack", "prepend_bos",
    ),
}


class StoreError(ValueError):
    """A store that cannot be used as asked; the message names the file or key and the fix."""


def fingerprint(recipe: Recipe) -> dict[str, dict[str, Any]]:
    """The model and data settings of `recipe` that the activations depend on."""
    sections = {"model": recipe.model, "data": recipe.data}
    return {name: {key: getattr(sections[name], key) for key in keys} for name, keys in FINGERPRINT_KEYS.items()}


def store_dtype(recipe: Recipe) -> str:
    return recipe.store.dtype or recipe.model.dtype


def store_layers(recipe: Recipe) -> list[int]:
    return sorted(set(recipe.store.layers or recipe.lorsa.layers))


@dataclass
class SplitPlan:
    """One split: how many forward batches of how many rows it should hold."""

    name: str
    batches: int
    rows_per_batch: int


def plan_splits(recipe: Recipe) -> list[SplitPlan]:
    """The splits a store for `recipe` holds, in the order they are written (the small ones first)."""
    data, training = recipe.data, recipe.training
    train_tokens = recipe.store.train_tokens
    train_batches = recipe.total_steps if train_tokens is None else math.ceil(train_tokens / recipe.tokens_per_step)
    return [
        SplitPlan("calibration", 1, recipe.init.calibration_sequences),
        SplitPlan("heldout", max(1, math.ceil(training.eval_sequences / data.batch_size)), data.batch_size),
        SplitPlan("train", train_batches, data.batch_size),
    ]


def row_bytes(context_length: int, hidden_size: int, layers: int, dtype: str) -> int:
    """Bytes one stored row takes: its token ids and mask, and each layer's input and output."""
    itemsize = STORE_DTYPES[dtype].itemsize
    return context_length * (2 * ROW_DTYPE.itemsize + 2 * layers * hidden_size * itemsize)


def activation_name(layer: int, kind: str) -> str:
    """Name of a layer's `inputs` or `outputs` tensor inside a shard."""
    return f"layers.{layer}.{kind}"


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.safetensors"


def new_manifest(recipe: Recipe, hidden_size: int) -> dict[str, Any]:
    """The manifest of an empty store for `recipe`; the writer fills in the shards."""
    return {
        "format": FORMAT,
        "version": VERSION,
        **fingerprint(recipe),
        "layers": store_layers(recipe),
        "hidden_size": hidden_size,
        "dtype": store_dtype(recipe),
        "splits": {
            plan.name: {
                "planned_batches": plan.batches, "rows_per_batch": plan.rows_per_batch, "shards": [],
                "complete": False, "exhausted": False,
            }
            for plan in plan_splits(recipe)
        },
        "tokens": {name: 0 for name in SPLITS},
        "complete": False,
    }


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """A store's manifest, checked to be one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{folder} is not an activation store (no {MANIFEST}); build one with `lorsa-hf store`.")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise StoreError(
            f"{path} is not a version-{VERSION} {FORMAT} manifest (format {manifest.get('format')!r}, "
            f"version {manifest.get('version')!r}); rebuild the store with this lorsa_hf."
        )
    return manifest


def write_manifest(folder: str | Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(Path(folder) / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))


def fingerprint_differences(manifest: dict[str, Any], recipe: Recipe) -> list[str]:
    """`key: store value != recipe value` for every fingerprint key on which they differ."""
    found = []
    for section, values in fingerprint(recipe).items():
        for key, value in values.items():
            stored = manifest[section].get(key)
            if stored != value:
                found.append(f"{section}.{key}: store {stored!r}, recipe {value!r}")
    return found


__all__ = [
    "FINGERPRINT_KEYS", "MANIFEST", "ROW_DTYPE", "SHARD_METADATA", "SPLITS", "STORE_DTYPES", "SplitPlan",
    "StoreError", "activation_name", "fingerprint", "fingerprint_differences", "new_manifest", "plan_splits",
    "read_manifest", "row_bytes", "shard_name", "store_dtype", "store_layers", "write_manifest",
]
