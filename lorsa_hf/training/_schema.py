"""Checking recipe values against the dataclass annotations of their section, with errors that name the key."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the key and what it must be."""


def unknown_key(where: str, key: str, valid: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"Unknown recipe key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


def check_type(path: str, value: Any, annotation: Any) -> Any:
    """Check (and lightly coerce: int -> float, tuple -> list) `value` against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return check_type(path, value, option)
            except RecipeError as error:
                errors.append(error)
        raise errors[0]
    if origin is Literal:
        if value not in args:
            raise RecipeError(f"Recipe key {path} must be one of {list(args)}, got {value!r}.")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise RecipeError(f"Recipe key {path} must be a list, got {value!r}.")
        return [check_type(f"{path}[{i}]", item, args[0]) for i, item in enumerate(value)]
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"Recipe key {path} must be a number, got {value!r}.")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecipeError(f"Recipe key {path} must be an integer, got {value!r}.")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"Recipe key {path} must be true or false, got {value!r}.")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise RecipeError(f"Recipe key {path} must be a string, got {value!r}.")
        return value
    return value


def build_section(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section {where.rstrip('.')!r} must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise unknown_key(where, key, names)
        kwargs[key] = check_type(f"{where}{key}", value, hints[key])
    return cls(**kwargs)


__all__ = ["RecipeError", "build_section", "check_type", "unknown_key"]
