"""Running a sweep: the shared store first, then each configuration as a normal training run in its own
folder, resumable one by one, with the processes of an `accelerate launch` each taking their share.

A configuration whose `final/final_metrics.json` exists is done and never rerun; one with checkpoints resumes
from the newest; one with neither starts over in a clean folder. Each process of a launch takes configurations
`rank, rank + world, ...` and trains them alone (the launch's process-group variables are removed from its
environment before any accelerator is made, so every run is an ordinary one-process run on its own device).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..io import atomic_write_text
from ..training import checkpoint
from ..training.activations import load_base_model
from ..training.recipe import Recipe
from ..training.store import ActivationStore, StoreError, build_store
from ..training.trainer import LorsaTrainer
from .plan import Configuration, SweepPlan, record_plan
from .summary import write_summary

RESULT_FILE = "sweep_result.json"
STORE_FAILED = "store-failed.txt"
LAUNCH_VARIABLES = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT",
    "TORCHELASTIC_MAX_RESTARTS", "TORCHELASTIC_USE_AGENT_STORE", "PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
)


def take_launch_share() -> tuple[int, int]:
    """(rank, world size) of this process in an `accelerate launch`/`torchrun` (0, 1 alone); afterwards this
    process trains on its own: the process-group variables are removed and it keeps its local GPU."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    for name in LAUNCH_VARIABLES:
        os.environ.pop(name, None)
    if world > 1 and torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return rank, world


def is_done(configuration: Configuration) -> bool:
    return (Path(configuration.output_dir) / "final" / "final_metrics.json").is_file()


def ensure_store(plan: SweepPlan, rank: int, poll_seconds: float = 2.0) -> None:
    """The main process builds (or finishes) the shared store; the others wait until it is complete."""
    if plan.store is None:
        return
    failed = Path(plan.output_dir) / STORE_FAILED
    if rank == 0:
        failed.unlink(missing_ok=True)
        try:
            build_store(plan.store_recipe())
        except BaseException as error:
            atomic_write_text(failed, f"{type(error).__name__}: {error}\n")
            raise
        return
    while True:
        if failed.is_file():
            raise StoreError(f"The main process could not build the store {plan.store}: {failed.read_text()}")
        try:
            if ActivationStore(plan.store).manifest["complete"]:
                return
        except (StoreError, FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(poll_seconds)


def run_configuration(
    configuration: Configuration, recipe: Recipe, base: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None
) -> dict[str, Any]:
    """Train one configuration (resuming it, or starting it over in a clean folder); its result record."""
    folder = Path(configuration.output_dir)
    resume = checkpoint.latest_checkpoint(folder / "checkpoints") is not None
    if not resume and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "recipe.json", json.dumps(recipe.to_dict(), indent=2))
    model, tokenizer = base if base is not None else (None, None)
    start = time.perf_counter()
    trainer = LorsaTrainer(recipe, model=model, tokenizer=tokenizer)
    metrics = trainer.train(resume=resume)
    result = {"seconds": time.perf_counter() - start, "resumed": resume, "metrics": metrics}
    atomic_write_text(folder / RESULT_FILE, json.dumps(result, indent=2))
    del trainer
    return result


def say(message: str) -> None:
    """A sweep progress line, flushed at once (a launcher or a log file reads them as they come)."""
    print(message, flush=True)


def run_sweep(plan: SweepPlan, rank: int = 0, world: int = 1, log: Callable[[str], None] = say) -> list[str]:
    """Run this process's share of the sweep; the names of its configurations that failed."""
    record_plan(plan, write=rank == 0)
    ensure_store(plan, rank)
    mine = [c for c in plan.configurations if c.index % world == rank]
    base = None
    failed = []
    for configuration in mine:
        if is_done(configuration):
            log(f"[sweep] {configuration.name}: done before, skipped")
            continue
        recipe = plan.recipe_of(configuration)
        if base is None:
            base = load_base_model(recipe)
        log(f"[sweep] {configuration.name}: training")
        try:
            result = run_configuration(configuration, recipe, base)
        except Exception as error:  # one configuration failing does not stop the others
            failed.append(configuration.name)
            trace = traceback.format_exc()
            atomic_write_text(Path(configuration.output_dir) / "sweep_error.txt", trace)
            log(f"[sweep] {configuration.name}: failed ({type(error).__name__}: {error})")
            continue
        log(f"[sweep] {configuration.name}: heldout/fvu {result['metrics'].get('heldout/fvu'):.4g}")
        write_summary(plan)
    write_summary(plan)
    return failed


__all__ = ["LAUNCH_VARIABLES", "RESULT_FILE", "ensure_store", "is_done", "run_configuration", "run_sweep",
           "take_launch_share"]
