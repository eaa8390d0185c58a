"""Training checkpoints written atomically by one or many processes, and the RNG state they carry.

A checkpoint is a folder `checkpoints/step-00000100` that appears in one rename once every process has
written its part into a staging folder beside it; a run killed while saving leaves only the staging folder,
which the next save removes. The folder holds the Lorsa weights (`lorsa/`, a normal `LorsaForReplacement`
folder), `trainer_state.json` (step, tokens, data position, recipe), `dead_tracker.safetensors`, and one
`training_state-rank{r}.pt` per process whose optimizer/scheduler state differs from the others'.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_text

CHECKPOINT_PREFIX = "step-"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (staging folders start with a dot and are skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def save_checkpoint(
    root: str | os.PathLike,
    step: int,
    write: Callable[[Path], None],
    is_main_process: bool,
    barrier: Callable[[], None],
    keep: int,
) -> Path:
    """Collectively write checkpoint `step`: every process calls this with its own `write(staging_folder)`.

    The main process prepares the staging folder, all processes write into it, and the main process renames
    it into place and removes all but the newest `keep` checkpoints. Needs a file system all processes share.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    staging = root / f".{final.name}.partial"
    if is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    write(staging)
    barrier()
    if is_main_process:
        if final.exists():
            retired = root / f".{final.name}.old"
            shutil.rmtree(retired, ignore_errors=True)
            os.replace(final, retired)
            shutil.rmtree(retired, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def write_json_atomic(path: str | os.PathLike, values: Any) -> None:
    """Write JSON to `path` through a temporary file and one rename."""
    atomic_write_text(path, json.dumps(values, indent=2, sort_keys=True))


def rng_state() -> dict[str, Any]:
    """Python and torch (CPU and CUDA) generator states, loadable with `torch.load(weights_only=True)`."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


__all__ = [
    "checkpoint_name", "latest_checkpoint", "list_checkpoints", "rng_state", "save_checkpoint", "set_rng_state",
    "write_json_atomic",
]
