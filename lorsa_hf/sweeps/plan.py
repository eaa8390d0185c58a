"""A sweep's plan: the recipe of every configuration and the store they share, written once to
`sweep_plan.json` so that a rerun of the same command continues the same sweep and another one is refused."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..io import atomic_write_text
from ..training.recipe import Recipe, RecipeError, apply_overrides, read_recipe_values, recipe_from_dict
from ..training.store.layout import fingerprint
from .grid import configuration_name, default_budget, expand, parse_arguments, with_qk_budget

PLAN_FILE = "sweep_plan.json"


@dataclass
class Configuration:
    """One run of the sweep: its overrides (the swept keys, and what the QK budget derived) and its folder."""

    index: int
    name: str
    overrides: dict[str, Any]
    output_dir: str


@dataclass
class SweepPlan:
    """Everything a sweep runs, from the command line."""

    recipe: str
    arguments: list[str]
    mode: Literal["grid", "list"]
    qk_budget: int | None
    output_dir: str
    store: str | None
    fixed: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)
    configurations: list[Configuration] = field(default_factory=list)

    def recipe_values(self, overrides: dict[str, Any], output_dir: str) -> dict[str, Any]:
        """The recipe dicts of a run with `overrides` (on top of the fixed ones), written to `output_dir`."""
        values = read_recipe_values(self.recipe)
        settings = {**self.fixed, **overrides, "output_dir": output_dir, "store.path": self.store}
        apply_overrides(values, [f"{key}={json.dumps(value)}" for key, value in settings.items()])
        return values

    def recipe_of(self, configuration: Configuration) -> Recipe:
        return recipe_from_dict(self.recipe_values(configuration.overrides, configuration.output_dir))

    def recipes(self) -> list[Recipe]:
        return [self.recipe_of(configuration) for configuration in self.configurations]

    def store_recipe(self) -> Recipe:
        """The recipe the shared store is built from: every configuration's layers, the most training tokens
        and held-out sequences any of them needs."""
        recipes = self.recipes()
        first = recipes[0]
        for recipe in recipes[1:]:
            if fingerprint(recipe) != fingerprint(first) or recipe.init.calibration_sequences != (
                first.init.calibration_sequences
            ):
                raise RecipeError(
                    f"Configuration {recipe.output_dir} changes the model or data settings, so it cannot share the "
                    "activation store of the others: sweep those keys with --live, or in separate sweeps."
                )
        values = self.recipe_values({}, self.output_dir)
        layers = sorted({layer for recipe in recipes for layer in recipe.lorsa.layers})
        tokens = max(recipe.total_steps for recipe in recipes) * first.tokens_per_step
        overrides = {
            "store.layers": layers, "store.train_tokens": tokens,
            "training.eval_sequences": max(recipe.training.eval_sequences for recipe in recipes),
        }
        apply_overrides(values, [f"{key}={json.dumps(value)}" for key, value in overrides.items()])
        return recipe_from_dict(values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(
    recipe: str, arguments: list[str], mode: Literal["grid", "list"] = "grid", qk_budget: int | str | None = None,
    output_dir: str | None = None, live: bool = False,
) -> SweepPlan:
    """Expand the command line into configurations, each checked to be a valid recipe."""
    fixed, axes = parse_arguments(arguments)
    values = read_recipe_values(recipe)
    apply_overrides(values, [f"{key}={json.dumps(value)}" for key, value in fixed.items()])
    base = recipe_from_dict(values)
    budget = default_budget(values, fixed) if qk_budget == "auto" else qk_budget
    folder = output_dir or f"{base.output_dir}-sweep"
    store = None if live else (base.store.path or str(Path(folder) / "store"))
    plan = SweepPlan(recipe, list(arguments), mode, budget, folder, store, fixed, {a.key: a.values for a in axes})
    for index, overrides in enumerate(expand(axes, mode)):
        if budget is not None:
            overrides = with_qk_budget(overrides, int(budget), values)
        name = configuration_name(index, overrides)
        plan.configurations.append(Configuration(index, name, overrides, str(Path(folder) / "runs" / name)))
    plan.recipes()
    return plan


def record_plan(plan: SweepPlan, write: bool) -> None:
    """Refuse a sweep folder that holds another sweep; write the plan there (`write`: the main process)."""
    path = Path(plan.output_dir) / PLAN_FILE
    if path.is_file():
        found = json.loads(path.read_text())
        if found != json.loads(json.dumps(plan.to_dict())):
            raise RecipeError(
                f"{plan.output_dir} holds another sweep ({PLAN_FILE} differs from this command's): rerun its own "
                "command to continue it, or sweep into another --output-dir."
            )
    elif write:
        atomic_write_text(path, json.dumps(plan.to_dict(), indent=2))


__all__ = ["PLAN_FILE", "Configuration", "SweepPlan", "make_plan", "record_plan"]
