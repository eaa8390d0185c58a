"""Training recipes: one YAML or TOML file per run, validated on load with errors that name the bad key.

A recipe has the sections `model`, `data`, `lorsa`, `init`, `training`, `store` and the top-level keys `name`
and `output_dir`. `lorsa` holds `LorsaConfig` fields (`layers`, `n_ov_heads`, `top_k`, ...); everything the Lorsa
section does not set comes from the base model (`LorsaConfig.from_base_config`). Command-line overrides are
`section.key=value` strings whose value is parsed as YAML (`training.lr=1e-3`, `lorsa.layers=[3,4]`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..resources import bundled_dir
from ._schema import RecipeError, build_section, check_type, unknown_key


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
    epochs: int = 1
    """Passes over the training text; a run of more tokens than the text holds needs more than one."""


@dataclass
class LorsaSection:
    """The Lorsa to train: `LorsaConfig` fields. Unset (None) fields come from the base model
    (`LorsaConfig.from_base_config`) or keep `LorsaConfig`'s default."""

    layers: list[int] | None = None
    """Base-model layer(s) whose attention the Lorsa replaces (required; one index is read as a list)."""
    n_ov_heads: int | None = None
    n_qk_heads: int | None = None
    d_qk_head: int | None = None
    top_k: int | None = None
    activation: Literal["topk_abs", "topk_relu"] | None = None
    attn_scale: float | None = None
    rotary_dim: int | None = None
    rotary_adjacent_pairs: bool | None = None
    use_qk_norm: bool | None = None
    qk_norm_eps: float | None = None
    initializer_range: float | None = None
    implementation: Literal["sparse", "dense"] | None = None
    cache_format: Literal["values", "inputs", "auto"] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields the recipe sets, in field order."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def config_overrides(self) -> dict[str, Any]:
        """Keyword arguments for `LorsaConfig.from_base_config` besides `layers`."""
        return {k: v for k, v in self.to_dict().items() if k != "layers"}


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
    from_pretrained: str | None = None
    """A saved `LorsaForReplacement` (folder or Hub id) to continue training from: its weights replace the steps
    above (`qk`, `ov`, `b_o`, `match_norm`); `freeze_qk` still applies."""


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
class StoreSection:
    """An activation store (`lorsa-hf store`): the base model's attention inputs and outputs, written once."""

    path: str | None = None
    """Folder of the store. Set: training reads activations from it instead of running the base model."""
    dtype: Literal["float32", "bfloat16", "float16"] | None = None
    """Dtype on disk; default `model.dtype`, which is lossless (the activations are that dtype already)."""
    layers: list[int] | None = None
    """Layers to store; default `lorsa.layers`. A store of more layers serves a recipe of any of them."""
    train_tokens: int | None = None
    """Training tokens to store; default what the recipe trains on. A longer store serves shorter runs."""
    shard_mb: float = 256.0
    """Approximate size of one shard file."""


@dataclass
class Recipe:
    """A complete training run."""

    name: str = "lorsa"
    output_dir: str = "runs/lorsa"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    lorsa: LorsaSection = field(default_factory=LorsaSection)
    init: InitSection = field(default_factory=InitSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    store: StoreSection = field(default_factory=StoreSection)

    def to_dict(self) -> dict[str, Any]:
        values = dataclasses.asdict(self)
        values["lorsa"] = self.lorsa.to_dict()
        return values

    @property
    def tokens_per_step(self) -> int:
        return self.data.batch_size * self.data.context_length

    @property
    def total_steps(self) -> int:
        if self.training.max_steps is not None:
            return self.training.max_steps
        return math.ceil(self.training.total_tokens / self.tokens_per_step)


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    """Build and validate a recipe from nested dicts (what a YAML/TOML file parses to)."""
    if not isinstance(values, dict):
        raise RecipeError(f"A recipe must be a mapping of sections, got {type(values).__name__}.")
    sections = {
        "model": ModelSection, "data": DataSection, "lorsa": LorsaSection, "init": InitSection,
        "training": TrainingSection, "store": StoreSection,
    }
    top = [f.name for f in dataclasses.fields(Recipe)]
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in top:
            raise unknown_key("", key, top)
        if key in ("lorsa", "store"):
            value = _layers_as_list(key, value or {})
        if key in sections:
            kwargs[key] = build_section(sections[key], value or {}, f"{key}.")
        else:
            kwargs[key] = check_type(key, value, str)
    recipe = Recipe(**kwargs)
    _validate(recipe)
    return recipe


def _layers_as_list(section: str, values: Any) -> Any:
    """A `lorsa` or `store` section with `layers` as a list (one index is read as a list of one)."""
    if not isinstance(values, dict) or values.get("layers") is None:
        return values
    layers = values["layers"]
    if isinstance(layers, int) and not isinstance(layers, bool):
        return {**values, "layers": [layers]}
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers):
        raise RecipeError(f"{section}.layers must be a layer index or a non-empty list of them, got {layers!r}.")
    return values


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
        ("training.eval_sequences", training.eval_sequences), ("training.dead_tokens", training.dead_tokens),
        ("training.k_initial", training.k_initial), ("training.k_aux", training.k_aux),
        ("data.heldout_documents", data.heldout_documents), ("data.epochs", data.epochs),
        ("store.train_tokens", recipe.store.train_tokens), ("store.shard_mb", recipe.store.shard_mb),
    ):
        if value is not None and value <= 0:
            raise RecipeError(f"Recipe key {path} must be positive, got {value}.")
    _check_numbers(training)
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
    if recipe.lorsa.layers is None:
        raise RecipeError("Set lorsa.layers: the base-model layer(s) whose attention the Lorsa replaces.")


def _check_numbers(training: TrainingSection) -> None:
    """Finite, in-range optimisation numbers (a negative clip norm would turn the step into gradient ascent)."""
    if training.clip_grad_norm is not None and not 0 < training.clip_grad_norm < math.inf:
        raise RecipeError(
            f"training.clip_grad_norm must be a positive number (or null for no clipping), got "
            f"{training.clip_grad_norm}."
        )
    if not math.isfinite(training.lr):
        raise RecipeError(f"training.lr must be finite, got {training.lr}.")
    if not 0 <= training.aux_loss_coef < math.inf:
        raise RecipeError(f"training.aux_loss_coef must be a number >= 0, got {training.aux_loss_coef}.")


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


def read_recipe_values(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """A recipe file (or bundled recipe name) parsed into nested dicts, not yet validated."""
    return _parse_file(resolve_recipe_path(name_or_path))


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
    "DataSection", "InitSection", "LorsaSection", "ModelSection", "Recipe", "RecipeError", "StoreSection",
    "TrainingSection",
    "apply_overrides", "load_recipe", "read_recipe_values", "recipe_from_dict", "resolve_recipe_path",
]
