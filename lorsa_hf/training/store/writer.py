"""Building an activation store: the base model runs once over the recipe's text and each forward batch's
attention inputs and outputs go to disk.

Shards are written whole through a temporary file and one rename, and the manifest is rewritten (the same way)
after each one, so a killed build leaves a store that resumes from its last recorded shard: the packer
position after that shard is in the manifest. The disk budget is planned before the first shard, and a store
that will not fit is refused.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ...io import atomic_write_path
from ..activations import ActivationSource, LayerActivations, load_base_model
from ..data import PackerState, TextSource, batches, packer, text_sources
from ..recipe import Recipe
from .layout import (
    MANIFEST,
    SHARD_METADATA,
    STORE_DTYPES,
    SplitPlan,
    StoreError,
    activation_name,
    fingerprint_differences,
    new_manifest,
    plan_splits,
    read_manifest,
    row_bytes,
    shard_name,
    store_dtype,
    store_layers,
    write_manifest,
)

DISK_MARGIN = 1.02
DISK_RESERVE = 64 * 2**20
"""Free space kept beyond the planned bytes: 2% for shard headers and the manifest, and 64 MiB."""


def planned_bytes(recipe: Recipe, hidden_size: int, manifest: dict[str, Any] | None = None) -> dict[str, int]:
    """Bytes each split still needs (all of it for a new store; what is not yet written when resuming)."""
    per_row = row_bytes(recipe.data.context_length, hidden_size, len(store_layers(recipe)), store_dtype(recipe))
    needed = {}
    for plan in plan_splits(recipe):
        done = 0
        if manifest is not None:
            split = manifest["splits"][plan.name]
            done = plan.batches if split["complete"] else sum(s["batches"] for s in split["shards"])
        needed[plan.name] = max(plan.batches - done, 0) * plan.rows_per_batch * per_row
    return needed


def check_disk(folder: Path, needed: int) -> None:
    """Refuse to start a store whose remaining shards will not fit on the disk holding `folder`."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    required = int(needed * DISK_MARGIN) + DISK_RESERVE
    if required > free:
        raise StoreError(
            f"The activation store {folder} needs {required / 2**30:.2f} GiB but {existing} has "
            f"{free / 2**30:.2f} GiB free: store fewer tokens (store.train_tokens), fewer layers (store.layers), "
            "a smaller dtype (store.dtype=bfloat16), or put it on a larger disk (store.path)."
        )


def _split_rows(
    plan: SplitPlan, recipe: Recipe, tokenizer: PreTrainedTokenizerBase, train_text: TextSource,
    heldout_text: TextSource, state: PackerState,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, PackerState]]:
    """The forward batches of one split from `state` on, exactly as a live run forms them."""
    text = heldout_text if plan.name == "heldout" else train_text
    return batches(packer(text, tokenizer, recipe.data, state), plan.rows_per_batch)


def _shard_bytes(
    split: str, chunk: list[tuple[torch.Tensor, torch.Tensor, PackerState, dict[int, LayerActivations]]],
    layers: list[int], dtype: torch.dtype,
) -> bytes:
    """One shard as safetensors bytes: rows, masks, each layer's inputs and outputs, packer states per batch."""
    tensors = {
        "input_ids": torch.cat([ids for ids, _, _, _ in chunk]),
        "attention_mask": torch.cat([mask for _, mask, _, _ in chunk]),
    }
    for layer in layers:
        for kind in ("inputs", "outputs"):
            parts = [getattr(acts[layer], kind).cpu().to(dtype) for _, _, _, acts in chunk]
            tensors[activation_name(layer, kind)] = torch.cat(parts).contiguous()
    # One metadata key: safetensors writes several in an order that changes from process to process, and a
    # resumed build must give the same bytes as an uninterrupted one.
    details = json.dumps({"split": split, "states": [state.to_dict() for _, _, state, _ in chunk]})
    return save(tensors, metadata={SHARD_METADATA: details})


def _write_shard(folder: Path, split: dict[str, Any], name: str, data: bytes, first: int, count: int,
                 rows: int, end_state: PackerState) -> None:
    """Write a shard file atomically and record it in the split's entry."""
    file = shard_name(name, len(split["shards"]))
    with atomic_write_path(folder / file) as staging:
        Path(staging).write_bytes(data)
    split["shards"].append({
        "file": file, "first_batch": first, "batches": count, "rows": rows, "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(), "end_state": end_state.to_dict(),
    })


def _build_split(
    folder: Path, manifest: dict[str, Any], plan: SplitPlan, source: ActivationSource, rows: Any,
    shard_batches: int, bar: tqdm,
) -> None:
    """Write the missing shards of one split, rewriting the manifest after each."""
    split = manifest["splits"][plan.name]
    done = sum(s["batches"] for s in split["shards"])
    dtype = STORE_DTYPES[manifest["dtype"]]
    chunk: list = []

    def flush() -> None:
        data = _shard_bytes(plan.name, chunk, manifest["layers"], dtype)
        rows_in_chunk = sum(ids.shape[0] for ids, _, _, _ in chunk)
        _write_shard(folder, split, plan.name, data, done, len(chunk), rows_in_chunk, chunk[-1][2])
        manifest["tokens"][plan.name] = sum(s["rows"] for s in split["shards"]) * manifest["data"]["context_length"]
        write_manifest(folder, manifest)

    for ids, attention, state in itertools.islice(rows, plan.batches - done):
        chunk.append((ids, attention, state, source(ids, attention)))
        bar.update(ids.numel())
        if len(chunk) == shard_batches:
            flush()
            done, chunk = done + len(chunk), []
    if chunk:
        flush()
        done += len(chunk)
    split["exhausted"] = done < plan.batches
    split["complete"] = True
    if plan.name == "heldout" and done == 0:
        raise StoreError(
            f"The held-out text gives fewer than data.batch_size={plan.rows_per_batch} rows of "
            f"{manifest['data']['context_length']} tokens: hold out more documents (data.heldout_documents)."
        )
    write_manifest(folder, manifest)


def _open_manifest(folder: Path, recipe: Recipe, hidden_size: int) -> dict[str, Any]:
    """The manifest to continue from: the existing one (checked against the recipe) or a new one."""
    fresh = new_manifest(recipe, hidden_size)
    if not (folder / MANIFEST).is_file():
        if folder.exists() and any(folder.iterdir()):
            raise StoreError(f"{folder} exists and is not an activation store: choose another store.path.")
        return fresh
    manifest = read_manifest(folder)
    for staging in folder.glob(".*.safetensors"):  # a shard a killed build was writing
        staging.unlink()
    differences = fingerprint_differences(manifest, recipe)
    if manifest["complete"]:  # a finished store serves any recipe it holds enough for (the trainer checks how much)
        missing = sorted(set(fresh["layers"]) - set(manifest["layers"]))
        if missing:
            differences.append(f"layers {missing} are not stored (the store has {manifest['layers']})")
        keys = ("dtype", "hidden_size")
    else:
        keys = ("layers", "dtype", "hidden_size")
        for name, split in fresh["splits"].items():
            for key in ("planned_batches", "rows_per_batch"):
                if manifest["splits"][name][key] != split[key]:
                    differences.append(f"{name} {key}: store {manifest['splits'][name][key]}, recipe {split[key]}")
    for key in keys:
        if manifest[key] != fresh[key]:
            differences.append(f"{key}: store {manifest[key]!r}, recipe {fresh[key]!r}")
    if differences:
        raise StoreError(
            f"The partly or fully built store {folder} was started for other settings ({'; '.join(differences)}): "
            "build into another store.path, or delete it to start over."
        )
    return manifest


def build_store(
    recipe: Recipe,
    model: PreTrainedModel | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    train_text: TextSource | None = None,
    heldout_text: TextSource | None = None,
    progress: bool = True,
) -> Path:
    """Build (or finish building) the activation store at `recipe.store.path`; returns its folder."""
    if not recipe.store.path:
        raise StoreError("Set store.path: the folder the activation store is written to.")
    folder = Path(recipe.store.path)
    if model is None or tokenizer is None:
        model, tokenizer = load_base_model(recipe)
    hidden_size = model.config.hidden_size
    manifest = _open_manifest(folder, recipe, hidden_size)
    if manifest["complete"]:
        return folder
    check_disk(folder, sum(planned_bytes(recipe, hidden_size, manifest).values()))
    if train_text is None or heldout_text is None:
        train_text, heldout_text = text_sources(recipe.data)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = ActivationSource(model.to(device).eval(), manifest["layers"])
    folder.mkdir(parents=True, exist_ok=True)
    per_batch = row_bytes(recipe.data.context_length, hidden_size, len(manifest["layers"]), manifest["dtype"])
    per_batch *= recipe.data.batch_size
    shard_batches = max(1, int(recipe.store.shard_mb * 2**20 // per_batch))
    plans = plan_splits(recipe)
    total = sum(p.batches * p.rows_per_batch for p in plans) * recipe.data.context_length
    done = sum(manifest["tokens"].values())
    with tqdm(total=total, initial=done, unit="tok", unit_scale=True, disable=not progress, desc="store") as bar:
        for plan in plans:
            split = manifest["splits"][plan.name]
            if split["complete"]:
                continue
            state = PackerState.from_dict(split["shards"][-1]["end_state"]) if split["shards"] else PackerState()
            rows = _split_rows(plan, recipe, tokenizer, train_text, heldout_text, state)
            _build_split(folder, manifest, plan, source, rows, shard_batches, bar)
    manifest["complete"] = True
    write_manifest(folder, manifest)
    return folder


__all__ = ["DISK_MARGIN", "DISK_RESERVE", "build_store", "check_disk", "planned_bytes"]
