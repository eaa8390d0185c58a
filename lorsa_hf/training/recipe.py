"""Training recipes: one YAML or TOML file per run, validated on load with errors that name the bad key.

A recipe has the sections `model`, `data`, `lorsa`, `init`, `training` and the top-level keys `name` and
`output_dir`. `lorsa` holds `LorsaConfig` fields (`layers`, `n_ov_heads`, `top_k`, ...); everything the Lorsa
config does not say comes from the base model (`LorsaConfig.from_base_config`). Command-line overrides are
`section.key=value` strings whose value is parsed as YAML (`training.lr=1e-3`, `lorsa.layers=[3,4]`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..resources import bundled_dir


class RecipeError(ValueError):
    """A recipe that cannot be run; the message names the key and what it must be."""


@dataclass
class ModelSection:
    """The frozen base model whose attention blocks the Lorsa learns to replace."""

    name: str = "embedded"
    """Hub id or local folder of a causal LM, or `"embedded"` for the model shipped with lorsa_hf."""
    revision: str | None = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype the base model runs in; the Lorsa itself always keeps float32 weights."""
    cache_dir: str | None = None
    attn_implementation: str | None = None


@dataclass
class DataSection:
    """Where the text comes from and how it becomes fixed-length rows."""

    source: Literal["embedded", "hf", "files"] = "embedded"
    path: str | None = None
    """`hf`: Hub dataset id or local dataset path (anything `datasets.load_dataset` takes)."""
    config_name: str | None = None
    split: str = "train"
    streaming: bool = False
    text_field: str = "text"
    """Field holding the text, for `hf` datasets and `.jsonl` files."""
    files: list[str] = field(default_factory=list)
    """`files`: `.txt` (one document per non-empty line) or `.jsonl` files, read in the order given."""
    heldout_split: str | None = None
    """`hf`: split used for held-out evaluation; when unset, the first `heldout_documents` are held out."""
    heldout_files: list[str] = field(default_factory=list)
    """`files`: held-out files; when empty, the first `heldout_documents` documents are held out."""
    heldout_documents: int = 200
    context_length: int = 256
    batch_size: int = 32
    """Sequences per optimizer step, over all processes together."""
    pack: bool = True
    """Concatenate documents (separated by EOS) and cut fixed-length rows; otherwise one padded row per document."""
    prepend_bos: bool = True


@dataclass
class InitSection:
    """How the Lorsa starts (docs/method.md §3); `qk: base, ov: base, b_o: mean, match_norm: true` is the
    MHSA initialisation."""

    qk: Literal["random", "base"] = "random"
    """`base`: QK group h copies base head h * n_heads // n_qk (GQA key heads expanded)."""
    ov: Literal["random", "base"] = "random"
    """`base`: each head's value/output pair is a rank-1 piece of its base head's OV circuit."""
    b_o: Literal["zero", "mean"] = "mean"
    """`mean`: b_O is the mean of what the heads leave unexplained of the target, over calibration tokens."""
    match_norm: bool = False
    """Rescale W_O so the mean output norm matches the mean centred target norm on calibration tokens."""
    freeze_qk: bool = False
    calibration_sequences: int = 8


@dataclass
class TrainingSection:
    """Optimisation, schedules, evaluation, checkpoints, logging and scale-out."""

    total_tokens: int | None = None
    max_steps: int | None = None
    """Either; with `total_tokens`, steps = ceil(total_tokens / (batch_size * context_length))."""
    lr: float = 2e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_fraction: float = 0.01
    lr_decay: Literal["cosine", "linear", "constant"] = "cosine"
    final_lr_fraction: float = 1 / 32
    clip_grad_norm: float | None = 0.15
    """Gradient-norm clipping of each Lorsa layer on its own."""
    k_initial: int | None = None
    """K at step 0, annealed to `lorsa.top_k` over `k_anneal_fraction` of the steps; unset: no annealing."""
    k_anneal_fraction: float = 0.05
    k_anneal: Literal["linear", "exponential"] = "linear"
    aux_loss_coef: float = 0.0
    """Weight of the auxiliary TopK loss that fits the residual error with the top `k_aux` dead heads."""
    k_aux: int | None = None
    """Dead heads used by the auxiliary loss; default hidden_size // 2."""
    dead_tokens: int = 10_000_000
    """A head is dead once it has not fired for this many (loss) tokens."""
    eval_every: int = 500
    eval_sequences: int = 64
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    mixed_precision: Literal["no", "bf16"] = "no"
    distribute: Literal["ddp", "layers", "fsdp"] = "ddp"
    """`ddp`: replicas on data shards; `layers`: each process trains its share of the layers on activations
    computed once and sent to it; `fsdp`: like ddp with each layer's parameters and Adam state sharded."""
    loggers: list[Literal["tensorboard", "wandb"]] = field(default_factory=list)
    """Optional trackers (through accelerate); JSON lines are always written to `metrics.jsonl`."""
    progress_bar: bool = True


@dataclass
class Recipe:
    """A complete training run."""

    name: str = "lorsa"
    output_dir: str = "runs/lorsa"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lorsa: dict[str, Any] = field(default_factory=dict)
    init: InitSection = field(default_factory=InitSection)
    training: TrainingSection = field(default_factory=TrainingSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.context_length

    @property
    def total_steps(self) -> int:
        if self.training.max_steps is not None:
            return self.training.max_steps
        return math.ceil(self.training.total_tokens / self.tokens_per_step)


def _lorsa_config_fields() -> set[str]:
    from ..configuration_lorsa import LorsaConfig

    own = vars(LorsaConfig).get("__annotations__", {})
    return {name for name in own if not name.startswith("_") and name not in _NOT_RECIPE_FIELDS}


# Fields of LorsaConfig that come from the base model or from transformers, not from a recipe.
_NOT_RECIPE_FIELDS = {
    "base_model_name_or_path", "base_model_revision", "base_model_type", "hidden_size", "num_hidden_layers",
    "base_num_attention_heads", "base_num_key_value_heads", "base_head_dim", "max_position_embeddings",
    "model_type", "rope_parameters",
}


def _unknown_key(where: str, key: str, valid: list[str]) -> RecipeError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return RecipeError(f"Unknown recipe key '{where}{key}'.{hint} Valid keys here: {', '.join(sorted(valid))}.")


def _check_type(path: str, value: Any, annotation: Any) -> Any:
    """Check (and lightly coerce: int -> float, tuple -> list) `value` against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _check_type(path, value, option)
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
        return [_check_type(f"{path}[{i}]", item, args[0]) for i, item in enumerate(value)]
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


def _build_section(cls: type, values: Any, where: str) -> Any:
    if not isinstance(values, dict):
        raise RecipeError(f"Recipe section {where.rstrip('.')!r} must be a mapping of keys to values, got {values!r}.")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise _unknown_key(where, key, names)
        kwargs[key] = _check_type(f"{where}{key}", value, hints[key])
    return cls(**kwargs)


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    """Build and validate a recipe from nested dicts (what a YAML/TOML file parses to)."""
    if not isinstance(values, dict):
        raise RecipeError(f"A recipe must be a mapping of sections, got {type(values).__name__}.")
    sections = {"model": ModelSection, "data": DataSection, "init": InitSection, "training": TrainingSection}
    top = [f.name for f in dataclasses.fields(Recipe)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in top:
            raise _unknown_key("", key, top)
        if key in sections:
            kwargs[key] = _build_section(sections[key], value or {}, f"{key}.")
        elif key == "lorsa":
            value = value or {}
            if not isinstance(value, dict):
                raise RecipeError(f"Recipe section 'lorsa' must be a mapping of LorsaConfig fields, got {value!r}.")
            valid = sorted(_lorsa_config_fields())
            for name in value:
                if name not in valid:
                    raise _unknown_key("lorsa.", name, valid)
            kwargs[key] = dict(value)
        else:
            kwargs[key] = _check_type(key, value, str)
    recipe = Recipe(**kwargs)
    _validate(recipe)
    return recipe


def _validate(recipe: Recipe) -> None:
    """Cross-field checks that single keys cannot express."""
    data, training = recipe.data, recipe.training
    if (training.total_tokens is None) == (training.max_steps is None):
        raise RecipeError("Set exactly one of training.total_tokens and training.max_steps.")
    for path, value in (
        ("training.total_tokens", training.total_tokens), ("training.max_steps", training.max_steps),
        ("data.batch_size", data.batch_size), ("data.context_length", data.context_length),
        ("training.eval_every", training.eval_every), ("training.checkpoint_every", training.checkpoint_every),
        ("training.log_every", training.log_every), ("training.keep_checkpoints", training.keep_checkpoints),
        ("init.calibration_sequences", recipe.init.calibration_sequences),
    ):
        if value is not None and value <= 0:
            raise RecipeError(f"Recipe key {path} must be positive, got {value}.")
    if data.context_length < 2:
        raise RecipeError(f"data.context_length must be at least 2 (a BOS and one token), got {data.context_length}.")
    if training.lr <= 0:
        raise RecipeError(f"training.lr must be positive, got {training.lr}.")
    if len(training.betas) != 2 or not all(0 <= b < 1 for b in training.betas):
        raise RecipeError(f"training.betas must be two numbers in [0, 1), got {training.betas}.")
    for path, value in (
        ("training.warmup_fraction", training.warmup_fraction),
        ("training.k_anneal_fraction", training.k_anneal_fraction),
        ("training.final_lr_fraction", training.final_lr_fraction),
    ):
        if not 0 <= value <= 1:
            raise RecipeError(f"Recipe key {path} must be between 0 and 1, got {value}.")
    if data.source == "hf" and not data.path:
        raise RecipeError("data.source is 'hf': set data.path to a Hub dataset id or a local dataset folder.")
    if data.source == "files" and not data.files:
        raise RecipeError("data.source is 'files': list the .txt/.jsonl files in data.files.")
    if "layers" in recipe.lorsa:
        layers = recipe.lorsa["layers"]
        if isinstance(layers, int):
            recipe.lorsa["layers"] = [layers]
        elif not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
            raise RecipeError(f"lorsa.layers must be a layer index or a non-empty list of them, got {layers!r}.")
    else:
        raise RecipeError("Set lorsa.layers: the base-model layer(s) whose attention the Lorsa replaces.")


def _parse_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            return yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise RecipeError(f"{path} is not valid YAML: {error}") from error
    if path.suffix == ".toml":
        import tomllib

        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise RecipeError(f"{path} is not valid TOML: {error}") from error
    if path.suffix == ".json":
        return json.loads(text)
    raise RecipeError(f"Recipe {path} must be a .yaml, .yml, .toml or .json file.")


def resolve_recipe_path(name_or_path: str | os.PathLike) -> Path:
    """A recipe file path, or the name of one bundled in the package's `recipes/` folder (`smollm2-135m`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    recipes_dir = bundled_dir("recipes")
    for suffix in (".yaml", ".yml", ".toml"):
        candidate = recipes_dir / f"{name_or_path}{suffix}"
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in recipes_dir.glob("*.*")) if recipes_dir.is_dir() else []
    raise RecipeError(f"No recipe file {str(name_or_path)!r}; give a path, or one of the bundled recipes: {known}.")


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` overrides (value parsed as YAML) to parsed recipe dicts, in place."""
    for override in overrides:
        if "=" not in override:
            raise RecipeError(f"Override {override!r} must look like section.key=value (e.g. training.lr=1e-3).")
        dotted, raw = override.split("=", 1)
        keys = dotted.strip().split(".")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as error:
            raise RecipeError(f"Override {override!r}: the value is not valid YAML ({error}).") from error
        target = values
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise RecipeError(f"Override {override!r}: {key!r} is not a section.")
        target[keys[-1]] = value
    return values


def load_recipe(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file."""
    path = resolve_recipe_path(name_or_path)
    values = _parse_file(path)
    apply_overrides(values, overrides or [])
    try:
        return recipe_from_dict(values)
    except RecipeError as error:
        raise RecipeError(f"{path}: {error}") from None


__all__ = [
    "DataSection", "InitSection", "ModelSection", "Recipe", "RecipeError", "TrainingSection", "apply_overrides",
    "load_recipe", "recipe_from_dict", "resolve_recipe_path",
]
