"""Sweep configurations: `key=v1,v2,...` arguments expanded into a grid (every combination, the first key
varying slowest) or a list (the i-th value of every key together), and the fixed QK parameter budget.

A key given one value is a fixed override of every configuration. Values are YAML, split at the commas that
are outside brackets and quotes, so `lorsa.layers=[3],[3,4]` is two values.

The QK parameter budget (the paper's d_qk ablation, at fixed parameters): a Lorsa layer's query/key side has
n_qk x d_qk x (2 d + 2) parameters (W_Q and W_K [n_qk, d, d_qk], b_Q and b_K [n_qk, d_qk]). Holding the
product n_qk x d_qk at a budget B keeps it fixed: a configuration that sets `lorsa.d_qk_head` gets
`lorsa.n_qk_heads = B / d_qk_head`, and one that sets `lorsa.n_qk_heads` gets `lorsa.d_qk_head = B / n_qk_heads`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from ..training.recipe import RecipeError

D_QK, N_QK, N_OV = "lorsa.d_qk_head", "lorsa.n_qk_heads", "lorsa.n_ov_heads"


@dataclass
class Axis:
    """One swept recipe key and its values, in the order written."""

    key: str
    values: list[Any]


def split_values(raw: str) -> list[str]:
    """`raw` cut at the commas outside brackets, braces and quotes."""
    parts, depth, quote, current = [], 0, None, ""
    for char in raw:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return [part.strip() for part in parts]


NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_value(text: str) -> Any:
    """A YAML value; numbers YAML 1.1 leaves as strings (`1e-3`, no dot) are read as numbers."""
    if not text:
        return None
    value = yaml.safe_load(text)
    if isinstance(value, str) and NUMBER.fullmatch(value):
        return float(value)
    return value


def parse_arguments(arguments: list[str]) -> tuple[dict[str, Any], list[Axis]]:
    """(fixed overrides, swept axes) from `key=v1,v2,...` arguments."""
    fixed: dict[str, Any] = {}
    axes: list[Axis] = []
    for argument in arguments:
        if "=" not in argument or not re.fullmatch(r"[A-Za-z_][\w.]*", argument.split("=", 1)[0].strip()):
            raise RecipeError(f"Sweep argument {argument!r} must look like section.key=v1,v2,... (lorsa.top_k=16,32).")
        key, raw = (part.strip() for part in argument.split("=", 1))
        if key in fixed or any(axis.key == key for axis in axes):
            raise RecipeError(f"Sweep key {key} is given twice; list all its values in one argument.")
        try:
            values = [parse_value(part) for part in split_values(raw)]
        except yaml.YAMLError as error:
            raise RecipeError(f"Sweep argument {argument!r}: a value is not valid YAML ({error}).") from error
        if len(values) == 1:
            fixed[key] = values[0]
        else:
            axes.append(Axis(key, values))
    return fixed, axes


def expand(axes: list[Axis], mode: Literal["grid", "list"] = "grid") -> list[dict[str, Any]]:
    """The configurations' overrides: every combination (`grid`) or the values taken together (`list`)."""
    if not axes:
        return [{}]
    if mode == "list":
        lengths = {axis.key: len(axis.values) for axis in axes}
        if len(set(lengths.values())) != 1:
            raise RecipeError(f"A list sweep needs the same number of values for every key, got {lengths}.")
        return [{axis.key: axis.values[i] for axis in axes} for i in range(len(axes[0].values))]
    combinations = itertools.product(*(axis.values for axis in axes))
    return [dict(zip((axis.key for axis in axes), combination, strict=True)) for combination in combinations]


def qk_parameters(n_qk_heads: int, d_qk_head: int, hidden_size: int, qk_norm: bool = False) -> int:
    """Query/key parameters of one Lorsa layer."""
    return n_qk_heads * d_qk_head * (2 * hidden_size + 2 + (2 if qk_norm else 0))


def lorsa_value(key: str, overrides: dict[str, Any], recipe_values: dict[str, Any]) -> Any:
    """A `lorsa.*` key's value in a configuration: its override, else the recipe's."""
    return overrides.get(key, recipe_values.get("lorsa", {}).get(key.split(".", 1)[1]))


def default_budget(recipe_values: dict[str, Any], fixed: dict[str, Any]) -> int:
    """n_qk_heads x d_qk_head of the recipe (after the fixed overrides)."""
    n_qk, d_qk = lorsa_value(N_QK, fixed, recipe_values), lorsa_value(D_QK, fixed, recipe_values)
    if not isinstance(n_qk, int) or not isinstance(d_qk, int):
        raise RecipeError(
            "--qk-budget auto takes n_qk_heads x d_qk_head from the recipe: set lorsa.n_qk_heads and "
            "lorsa.d_qk_head in it, or give the budget as a number (--qk-budget 576)."
        )
    return n_qk * d_qk


def with_qk_budget(overrides: dict[str, Any], budget: int, recipe_values: dict[str, Any]) -> dict[str, Any]:
    """`overrides` with the QK side that keeps n_qk_heads x d_qk_head = `budget` (see the module docstring)."""
    if (D_QK in overrides) == (N_QK in overrides):
        if D_QK in overrides:
            raise RecipeError(f"With a QK budget, sweep {D_QK} or {N_QK}, not both: the budget sets the other.")
        return dict(overrides)
    given, derived = (D_QK, N_QK) if D_QK in overrides else (N_QK, D_QK)
    value = overrides[given]
    if not isinstance(value, int) or value <= 0 or budget % value:
        raise RecipeError(
            f"{given}={value} does not divide the QK budget n_qk_heads x d_qk_head = {budget}: choose a budget "
            f"every swept value divides (--qk-budget N)."
        )
    result = {**overrides, derived: budget // value}
    n_ov, n_qk = lorsa_value(N_OV, result, recipe_values), result.get(N_QK, lorsa_value(N_QK, result, recipe_values))
    if isinstance(n_ov, int) and n_ov % n_qk:
        raise RecipeError(
            f"{given}={value} gives n_qk_heads={n_qk}, which does not divide lorsa.n_ov_heads={n_ov}: choose "
            "another QK budget or n_ov_heads."
        )
    return result


def configuration_name(index: int, overrides: dict[str, Any]) -> str:
    """Folder name of a configuration: its index and its overrides (`003-top_k=16`)."""
    parts = [f"{key.rsplit('.', 1)[-1]}={value}" for key, value in overrides.items()]
    text = re.sub(r"[^\w.=,+-]+", "", "_".join(parts).replace(" ", ""))
    return f"{index:03d}" + (f"-{text[:80]}" if text else "")


__all__ = [
    "Axis", "configuration_name", "default_budget", "expand", "lorsa_value", "parse_arguments", "parse_value",
    "qk_parameters", "split_values", "with_qk_budget",
]
