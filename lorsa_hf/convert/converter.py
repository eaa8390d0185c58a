"""`convert_checkpoint`: foreign Lorsa folder(s) -> `LorsaForReplacement` (and optionally our format on disk)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._io import atomic_save_directory
from ..configuration_lorsa import LorsaConfig
from ..modeling_lorsa import LorsaForReplacement
from .base_model import BaseModelInfo, BaseModelLike, load_base_model_info
from .folding import fold
from .foreign import CheckpointError, ForeignLorsa, read_json_config
from .hub import fetch_folder, is_local, split_source
from .llamascopium import WEIGHTS_FILE as LLAMASCOPIUM_WEIGHTS
from .llamascopium import is_llamascopium_config, layer_from_hooks, read_llamascopium
from .paper_era import WEIGHTS_FILE as PAPER_ERA_WEIGHTS
from .paper_era import is_paper_era_config, read_paper_era
from .report import REPORT_FILE, ConversionReport, LayerReport

FOREIGN_FORMATS = ("llamascopium", "paper_era")
_CONFIG_PATTERNS = ["config.json", "*/config.json"]


class Conversion(NamedTuple):
    """The converted Lorsa and the report of what was folded into it."""

    lorsa: LorsaForReplacement
    report: ConversionReport


def _format_of(config: dict[str, Any]) -> str | None:
    if config.get("model_type") == LorsaConfig.model_type:
        return "lorsa_hf"
    if is_llamascopium_config(config):
        return "llamascopium"
    if is_paper_era_config(config):
        return "paper_era"
    return None


def _checkpoints(root: Path) -> dict[Path, str]:
    """The Lorsa checkpoint folders at `root`: `root` itself when it holds a config.json, else every immediate
    subfolder holding one in a format we know (one subfolder per layer)."""
    if (root / "config.json").is_file():
        return {root: _format_of(read_json_config(root)) or "unknown"}
    found = {}
    for child in sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        kind = _format_of(read_json_config(child))
        if kind is not None:
            found[child] = kind
    return found


def foreign_format(
    source: str | os.PathLike,
    subfolder: str = "",
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> str | None:
    """`"llamascopium"` or `"paper_era"` when `source/subfolder` (a folder or Hub repo) holds a Lorsa in that
    format, or one such subfolder per layer; None for our own format and for anything unreadable (left for
    `from_pretrained` to report)."""
    source, subfolder = split_source(source, subfolder)
    try:
        root = fetch_folder(source, _CONFIG_PATTERNS, subfolder, revision, cache_dir, token)
        kinds = set(_checkpoints(root).values())
    except CheckpointError:
        return None
    foreign = sorted(kinds & set(FOREIGN_FORMATS))
    return foreign[0] if foreign else None


def _recorded_layer(folder: Path, kind: str) -> int | None:
    config = read_json_config(folder)
    if kind == "llamascopium":
        return layer_from_hooks(config, folder)
    layer = config.get("layer")
    return layer if isinstance(layer, int) and not isinstance(layer, bool) else None


def _select(found: dict[Path, str], root: Path, layers: list[int] | None) -> dict[int, tuple[Path, str]]:
    """Base-model layer -> (folder, format) for the layers to convert."""
    for folder, kind in found.items():
        if kind == "lorsa_hf":
            raise CheckpointError(
                f"{folder} already is a lorsa_hf checkpoint; load it with LorsaForReplacement.from_pretrained."
            )
        if kind not in FOREIGN_FORMATS:
            raise CheckpointError(
                f"{folder}/config.json is neither a llamascopium Lorsa (sae_type 'lorsa') nor a paper-era "
                "OpenMOSS/Lorsa config (n_ov_heads, d_ov_head); nothing to convert."
            )
    if not found:
        raise CheckpointError(
            f"{root} holds no Lorsa checkpoint: expected a config.json there, or one subfolder per layer with one."
        )
    if len(found) == 1:
        ((folder, kind),) = found.items()
        recorded = _recorded_layer(folder, kind)
        if recorded is None:
            if layers is None or len(layers) != 1:
                raise CheckpointError(
                    f"{folder}/config.json records no layer; say which base-model layer it replaces "
                    "(layers=[L], --layer L)."
                )
            return {layers[0]: (folder, kind)}
        if layers is not None and layers != [recorded]:
            raise CheckpointError(
                f"{folder} was trained for layer {recorded}, not {layers}; a Lorsa only reproduces the layer it was "
                "trained on."
            )
        return {recorded: (folder, kind)}
    by_layer: dict[int, tuple[Path, str]] = {}
    for folder, kind in found.items():
        recorded = _recorded_layer(folder, kind)
        if recorded is None:
            raise CheckpointError(f"{folder}/config.json records no layer, so its place among the layers is unknown.")
        if recorded in by_layer:
            raise CheckpointError(f"{by_layer[recorded][0]} and {folder} both replace layer {recorded}.")
        by_layer[recorded] = (folder, kind)
    if layers is None:
        return dict(sorted(by_layer.items()))
    absent = [layer for layer in layers if layer not in by_layer]
    if absent:
        raise CheckpointError(f"{root} has no Lorsa for layer(s) {absent}; it holds layers {sorted(by_layer)}.")
    return {layer: by_layer[layer] for layer in layers}


def _read(folder: Path, kind: str, weights_already_folded: bool) -> ForeignLorsa:
    if kind == "llamascopium":
        return read_llamascopium(folder, weights_already_folded=weights_already_folded)
    return read_paper_era(folder, weights_already_folded=weights_already_folded)


_SHARED = (
    "n_ov_heads",
    "n_qk_heads",
    "d_qk_head",
    "top_k",
    "activation",
    "attn_scale",
    "rotary_dim",
    "rotary_adjacent_pairs",
    "rope_parameters",
    "use_qk_norm",
    "qk_norm_eps",
)


def _check_against_base(foreign: dict[int, ForeignLorsa], base: BaseModelInfo) -> None:
    first_layer, first = next(iter(foreign.items()))
    for layer, lorsa in foreign.items():
        if lorsa.d_model != base.config.hidden_size:
            raise CheckpointError(
                f"{lorsa.path} was trained for d_model {lorsa.d_model} but the base model {base.name or ''} has hidden "
                f"size {base.config.hidden_size}; pass the base model this Lorsa was trained on."
            )
        for name in _SHARED:
            if getattr(lorsa, name) != getattr(first, name):
                raise CheckpointError(
                    f"Layers {first_layer} and {layer} differ in {name} ({getattr(first, name)!r} vs "
                    f"{getattr(lorsa, name)!r}); one LorsaForReplacement shares these across its layers: convert "
                    "them separately (layers=[...])."
                )


def _describe_source(folder: Path, source: str | os.PathLike, root: Path, subfolder: str, revision: str | None) -> str:
    """The folder as the user named it: a local path, or `repo_id/subfolder@revision` for a Hub repo."""
    if is_local(source):
        return str(folder)
    inside = "/".join(
        part for part in (subfolder.strip("/"), folder.relative_to(root).as_posix()) if part not in ("", ".")
    )
    return f"{os.fspath(source)}{'/' + inside if inside else ''}@{revision or 'main'}"


def _layer_report(lorsa: ForeignLorsa, base: BaseModelInfo, source: str) -> LayerReport:
    if not lorsa.input_is_normalized_residual:
        input_norm = "not folded (the checkpoint was trained on the attention input itself)"
    elif base.norms[lorsa.layer][1] is not None:
        input_norm = "LayerNorm gain and bias folded into W_Q, W_K, W_V and their biases"
    else:
        input_norm = "RMSNorm gain folded into W_Q, W_K, W_V"
    rope = lorsa.rope_parameters
    rotary = (
        "none"
        if lorsa.rotary_dim == 0
        else (
            f"{lorsa.rotary_dim} dims, {'adjacent pairs' if lorsa.rotary_adjacent_pairs else 'rotate-half pairs'}, "
            f"{rope['rope_type']} theta {rope['rope_theta']:g}"
            + (
                f" (factor {rope['factor']}, low {rope['low_freq_factor']}, high {rope['high_freq_factor']}, "
                f"original context {rope['original_max_position_embeddings']})"
                if rope["rope_type"] == "llama3"
                else ""
            )
        )
    )
    return LayerReport(
        layer=lorsa.layer,
        source_format=lorsa.format,
        source=source,
        n_ov_heads=lorsa.n_ov_heads,
        n_qk_heads=lorsa.n_qk_heads,
        d_qk_head=lorsa.d_qk_head,
        top_k=lorsa.top_k,
        activation=lorsa.activation,
        attn_scale=lorsa.attn_scale,
        rotary=rotary,
        qk_norm=f"per-group RMS norm, eps {lorsa.qk_norm_eps:g}" if lorsa.use_qk_norm else "none",
        input_norm_folded=input_norm,
        dataset_norm=lorsa.dataset_norm,
        input_scale=lorsa.input_scale,
        output_scale=lorsa.output_scale,
        notes=list(lorsa.notes),
    )


def convert_checkpoint(
    source: str | os.PathLike,
    base_model: BaseModelLike,
    output_dir: str | os.PathLike | None = None,
    *,
    layers: int | Sequence[int] | None = None,
    subfolder: str = "",
    revision: str | None = None,
    base_revision: str | None = None,
    weights_already_folded: bool = False,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
) -> Conversion:
    """Convert a Lorsa published by llamascopium (lm-saes) or by the paper-era OpenMOSS/Lorsa code.

    The format is detected from config.json. The base model's input-norm gain and bias and the dataset-wise
    normalisation factors are folded into the weights, so that, spliced into the Hugging Face model, the Lorsa
    computes exactly what the original implementation computed (see `lorsa_hf.convert.folding`).

    Args:
        source: A checkpoint folder, or a folder / Hub repo holding one checkpoint subfolder per layer; local path
            or Hub repo id (with `subfolder` and `revision`; llamascopium's `repo_id:subfolder` also works).
        base_model: The base model (loaded, or a folder / Hub repo id whose config and safetensors are read).
        output_dir: When given, the converted Lorsa and `conversion_report.json` are written there atomically.
        layers: Base-model layer(s) to convert from a multi-layer source (default: all), or the layer of a
            single checkpoint that does not record it.
        weights_already_folded: The stored weights already include the dataset-wise normalisation, whatever the
            config says. Needed for the folder a finished llamascopium training run writes: its config.json still
            says "dataset-wise" but the weights were folded at the end; nothing in the files tells the two apart.
        dtype: dtype of the converted weights (folding itself runs in float64).

    Returns:
        `Conversion(lorsa, report)`.
    """
    layer_list = None if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    source, subfolder = split_source(source, subfolder)
    hub = dict(revision=revision, cache_dir=cache_dir, token=token)
    root = fetch_folder(source, _CONFIG_PATTERNS, subfolder, **hub)
    selected = _select(_checkpoints(root), root, layer_list)
    if not is_local(source):
        prefixes = [
            "" if folder == root else f"{folder.relative_to(root).as_posix()}/" for folder, _ in selected.values()
        ]
        files = ("config.json", LLAMASCOPIUM_WEIGHTS, PAPER_ERA_WEIGHTS)
        fetch_folder(source, [prefix + name for prefix in prefixes for name in files], subfolder, **hub)

    foreign = {}
    for layer, (folder, kind) in selected.items():
        lorsa = _read(folder, kind, weights_already_folded)
        lorsa.layer = layer
        foreign[layer] = lorsa
    base = load_base_model_info(base_model, list(foreign), revision=base_revision, cache_dir=cache_dir, token=token)
    _check_against_base(foreign, base)

    first = next(iter(foreign.values()))
    config = LorsaConfig.from_base_config(
        base.config,
        list(foreign),
        base_model_name_or_path=base.name,
        base_model_revision=base.revision,
        n_ov_heads=first.n_ov_heads,
        n_qk_heads=first.n_qk_heads,
        d_qk_head=first.d_qk_head,
        top_k=first.top_k,
        activation=first.activation,
        attn_scale=first.attn_scale,
        rotary_dim=first.rotary_dim,
        rotary_adjacent_pairs=first.rotary_adjacent_pairs,
        rope_parameters=first.rope_parameters,
        use_qk_norm=first.use_qk_norm,
        qk_norm_eps=first.qk_norm_eps,
    )
    model = LorsaForReplacement(config).to(dtype).eval()
    for layer, lorsa in foreign.items():
        gain, bias = base.norms[layer]
        model.layer(layer).load_state_dict(fold(lorsa, gain, bias, dtype=dtype))
    report = ConversionReport(
        base_model=base.name,
        base_model_type=base.config.model_type,
        layers=[
            _layer_report(lorsa, base, _describe_source(lorsa.path, source, root, subfolder, revision))
            for lorsa in foreign.values()
        ],
    )
    if output_dir is not None:
        with atomic_save_directory(output_dir) as staging:
            model.save_pretrained(staging)
            Path(staging, REPORT_FILE).write_text(report.to_json())
    return Conversion(model, report)


def load_if_foreign(
    source: str | os.PathLike | None,
    base_model: BaseModelLike | None,
    weights_already_folded: bool,
    from_pretrained_kwargs: dict[str, Any],
) -> LorsaForReplacement | None:
    """What `LorsaForReplacement.from_pretrained` returns for a foreign folder (converted on the fly against
    `base_model`), or None when `source` is not one and the regular loader applies."""
    hub = {key: from_pretrained_kwargs.get(key) for key in ("revision", "cache_dir", "token")}
    subfolder = from_pretrained_kwargs.get("subfolder") or ""
    kind = None if source is None else foreign_format(source, subfolder, **hub)
    if kind is None:
        if weights_already_folded:
            raise ValueError(
                "weights_already_folded only applies to foreign (llamascopium, paper-era) checkpoints; "
                f"{source} is not one."
            )
        return None
    if base_model is None:
        raise ValueError(
            f"{source} holds a {kind} Lorsa checkpoint; converting it needs the base model it was trained on: "
            "pass base_model= (the loaded model, or its folder / Hub repo id)."
        )
    dtype = from_pretrained_kwargs.get("dtype")
    return convert_checkpoint(
        source,
        base_model,
        subfolder=subfolder,
        weights_already_folded=weights_already_folded,
        dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
        **hub,
    ).lorsa
