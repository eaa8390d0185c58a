"""Training checkpoints written atomically by one or many processes, and the RNG state they carry.

A checkpoint is a folder `checkpoints/step-00000100` that appears in one rename once every process has
written its part into a staging folder beside it; a run killed while saving leaves only the staging folder,
which the next save removes. The folder holds the Lorsa weights (`lorsa/`, a normal `LorsaForReplacement`
folder), `trainer_state.json` (step, tokens, data position, recipe), `dead_tracker.safetensors`, and one
`training_state-rank{r}.pt` per process whose optimizer/scheduler state differs from the others'.
A run resumes only with a recipe that gives the same weights (`check_resumable`).
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
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..io import atomic_save_directory, atomic_write_text
from ..modeling_lorsa import LorsaForReplacement
from ..publishing import FINAL_METRICS_FILE, HISTORY_FILE, RECIPE_FILE
from .data import PackerState
from .recipe import Recipe, RecipeError

# Recipe keys that may change when a run is resumed: they do not affect the weights.
RESUMABLE_CHANGES = {
    "output_dir", "training.eval_every", "training.eval_sequences", "training.checkpoint_every",
    "training.keep_checkpoints", "training.log_every", "training.loggers", "training.progress_bar",
    "model.cache_dir", "model.attn_implementation",
    # Where the activations come from: a store holds the activations a live run computes, bit for bit.
    "store.path", "store.layers", "store.train_tokens", "store.shard_mb",
}

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


def trainer_state(
    step: int, recipe: Recipe, world_size: int, packer_state: PackerState, history: list[dict[str, Any]]
) -> dict[str, Any]:
    """`trainer_state.json`: where the run stands, the recipe it must resume with, and the earlier training
    stages as the run found them when it started (a resume keeps them even if the start folder changed)."""
    return {
        "step": step,
        "tokens": step * recipe.tokens_per_step,
        "total_steps": recipe.total_steps,
        "data": packer_state.to_dict(),
        "world_size": world_size,
        "distribute": recipe.training.distribute,
        "recipe": recipe.to_dict(),
        "history": history,
    }


def write_main_files(
    folder: Path, lorsa: LorsaForReplacement, trainer_state: dict[str, Any], tokens_since_fired: torch.Tensor
) -> None:
    """What the main process writes into a checkpoint: weights, trainer state, dead-head tracker."""
    lorsa.save_pretrained(folder / "lorsa")
    write_json_atomic(folder / "trainer_state.json", trainer_state)
    save_file({"tokens_since_fired": tokens_since_fired}, str(folder / "dead_tracker.safetensors"))


def write_training_state(
    folder: Path, rank: int, optimizer_state: dict[str, Any], scheduler_state: dict[str, Any]
) -> None:
    """A process's optimizer and scheduler state, with the RNG state at this moment."""
    state = {"optimizer": optimizer_state, "scheduler": scheduler_state, "rng": rng_state()}
    torch.save(state, folder / f"training_state-rank{rank}.pt")


def read_trainer_state(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "trainer_state.json").read_text())


def read_weights(folder: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named tensors of a checkpoint's Lorsa weights (a process reads only the layers it trains)."""
    with safe_open(str(folder / "lorsa" / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in names}


def read_training_state(folder: Path, rank: int) -> dict[str, Any]:
    return torch.load(folder / f"training_state-rank{rank}.pt", weights_only=True, map_location="cpu")


def read_dead_tracker(folder: Path) -> torch.Tensor:
    return load_file(str(folder / "dead_tracker.safetensors"))["tokens_since_fired"]


def check_resumable(state: dict[str, Any], recipe: Recipe, world_size: int) -> None:
    """Refuse a checkpoint written in another mode, by another number of layer-owning processes, or with a
    recipe that changes the weights."""
    mode = recipe.training.distribute
    if state["world_size"] != world_size and mode == "layers":
        raise RecipeError(
            f"The checkpoint was written by {state['world_size']} processes in {state['distribute']!r} mode; "
            f"resume it with the same number of processes (got {world_size})."
        )
    if state["distribute"] != mode:
        raise RecipeError(f"The checkpoint was written in {state['distribute']!r} mode, this run is {mode!r}.")
    old, new = flatten_recipe(state["recipe"]), flatten_recipe(recipe.to_dict())
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed)
        raise RecipeError(f"Cannot resume with a different recipe ({details}); the weights would not match.")


def flatten_recipe(values: dict[str, Any], prefix: str = "", scalars_only: bool = False) -> dict[str, Any]:
    """`section.key` -> value; with `scalars_only`, other values as strings (what trackers accept)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key != "lorsa":
            flat.update(flatten_recipe(value, f"{name}.", scalars_only))
        elif isinstance(value, dict):
            for sub, item in value.items():
                keep = not scalars_only or isinstance(item, (int, float, str, bool))
                flat[f"{name}.{sub}"] = item if keep else str(item)
        elif scalars_only and not isinstance(value, (int, float, str, bool)):
            flat[name] = str(value)
        else:
            flat[name] = value
    return flat


def save_final_folder(
    folder: Path, lorsa: LorsaForReplacement, recipe: Recipe, metrics: dict[str, Any],
    history: list[dict[str, Any]] | None = None,
) -> None:
    """`final/`: a `LorsaForReplacement` folder plus `training_recipe.json` and `final_metrics.json` (and, for a
    run continued from an earlier Lorsa, `training_history.json` with the earlier stages), in place in one rename."""
    with atomic_save_directory(folder) as staging:
        lorsa.save_pretrained(staging)
        write_json_atomic(Path(staging) / RECIPE_FILE, recipe.to_dict())
        write_json_atomic(Path(staging) / FINAL_METRICS_FILE, metrics)
        if history:
            write_json_atomic(Path(staging) / HISTORY_FILE, {"stages": history})


# What a run writes into its output_dir: a folder holding any of these holds a run.
RUN_ENTRIES = ("checkpoints", "final", "metrics.jsonl", "trainer_state.json")


def prepare_output_dir(output_dir: Path, overwrite: bool, is_main_process: bool) -> None:
    """Refuse a new run into a folder that holds one (its checkpoints would be pruned as if they were the new
    run's, and the two runs' metrics mixed), unless `overwrite`, which clears the folder first (main process)."""
    found = sorted(name for name in RUN_ENTRIES if (output_dir / name).exists())
    if not found:
        return
    if not overwrite:
        raise FileExistsError(
            f"output_dir {output_dir} already holds a run ({', '.join(found)}). Continue it with --resume, "
            f"choose another folder (output_dir=...), or pass --overwrite to delete it and start again."
        )
    if is_main_process:
        for entry in output_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


__all__ = [
    "RUN_ENTRIES",
    "prepare_output_dir",
    "RESUMABLE_CHANGES", "check_resumable", "checkpoint_name", "flatten_recipe", "latest_checkpoint",
    "list_checkpoints", "read_dead_tracker", "read_trainer_state", "read_training_state", "read_weights",
    "rng_state", "save_checkpoint", "save_final_folder", "set_rng_state", "trainer_state", "write_json_atomic",
    "write_main_files", "write_training_state",
]
