"""Reader for the paper-era format (GitHub OpenMOSS/Lorsa): `config.json` (a dataclass dump with `n_ov_heads`,
`d_ov_head`, `mode`, `avg_norm`, `layer`, ...) and `final.pth`, a torch state dict.

Conventions (docs/method.md §6): the input already is the Hugging Face attention input (the norm's output with
gain and bias), selection is TopK over `|z| * ||W_O||` with signed `z` kept, and the official loader folds
`avg_norm` at load time (`W_Q, W_K, W_V *= sqrt(d)/avg_norm.in`, `W_O, b_O /= sqrt(d)/avg_norm.out`).
`final.pth` is only ever read with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import math
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch

from .foreign import (
    CheckpointError,
    ForeignLorsa,
    check_rotary_buffers,
    check_shapes,
    read_json_config,
    require,
    rotary_settings,
)

WEIGHTS_FILE = "final.pth"
_KEYS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")
_BUFFERS = {"mask", "IGNORE", "rotary_sin", "rotary_cos"}


def is_paper_era_config(config: dict[str, Any]) -> bool:
    return "n_ov_heads" in config and "d_ov_head" in config and "model_type" not in config


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} has a paper-era config.json but no {WEIGHTS_FILE}; fetch the whole folder.")
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        disallowed = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if disallowed is None:
            raise CheckpointError(
                f"Cannot read {file}: it is no torch state dict; it is corrupt or truncated."
            ) from None
        raise CheckpointError(
            f"{file} holds {disallowed.group(1)}, which needs unrestricted unpickling; lorsa_hf refuses that (it can "
            "run arbitrary code) and loads only plain tensor state dicts (torch.load with weights_only=True). "
            "Re-save the state dict with tensors only."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"Cannot read {file} ({error}): the file is corrupt or truncated.") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{file} is not a state dict of tensors (got {type(state_dict).__name__}).")
    return state_dict


def read_paper_era(path: Path, weights_already_folded: bool = False) -> ForeignLorsa:
    """Read one paper-era Lorsa folder.

    Args:
        weights_already_folded: The weights already include the `avg_norm` factors (a state dict re-saved after
            the official loader folded them); `avg_norm` is then ignored instead of being applied twice.
    """
    config = read_json_config(path)
    n_qk_heads = require(config, "n_qk_heads", int, path)
    n_ov_heads = require(config, "n_ov_heads", int, path)
    d_qk_head = require(config, "d_qk_head", int, path)
    d_model = require(config, "d_model", int, path)
    if config.get("d_ov_head") != 1:
        raise CheckpointError(
            f"{path}: d_ov_head {config.get('d_ov_head')!r} is not supported; Lorsa heads have d_ov_head 1."
        )
    if config.get("virtual_kv_num", 0):
        raise CheckpointError(
            f"{path}: virtual_kv_num {config['virtual_kv_num']} (learned extra keys) is not supported."
        )
    mode = config.get("mode")
    if mode != "top_k":
        raise CheckpointError(
            f"{path}: mode {mode!r} is not supported; lorsa_hf imports Lorsas trained with mode 'top_k'."
        )
    top_k = require(config, "top_k", int, path)
    layer = config.get("layer")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool) or layer < 0):
        raise CheckpointError(f"{path}/config.json: layer is {layer!r}, expected a layer index.")
    rotary_dim, adjacent, rope_parameters = rotary_settings(config, d_qk_head, path)
    attn_scale = config.get("attn_scale")
    attn_scale = math.sqrt(d_qk_head) if attn_scale is None else attn_scale

    stored = _load_state_dict(path)
    missing = sorted(key for key in _KEYS if key not in stored)
    if missing:
        raise CheckpointError(f"{path / WEIGHTS_FILE} lacks {missing}; the file is truncated or from another model.")
    unexpected = sorted(key for key in stored if key not in _KEYS and key not in _BUFFERS)
    if unexpected:
        raise CheckpointError(f"{path / WEIGHTS_FILE} holds {unexpected}, which a paper-era Lorsa does not have.")
    for name, shape in (("W_V", (n_ov_heads, d_model, 1)), ("W_O", (n_ov_heads, 1, d_model)), ("b_V", (n_ov_heads, 1))):
        if tuple(stored[name].shape) != shape:
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(stored[name].shape)} but its config implies {shape}; config and "
                "weights do not belong together."
            )
    tensors = {key: stored[key] for key in ("W_Q", "W_K", "b_Q", "b_K", "b_O")}
    tensors.update(W_V=stored["W_V"][..., 0], W_O=stored["W_O"][:, 0, :], b_V=stored["b_V"][:, 0])

    lorsa = ForeignLorsa(
        format="paper_era",
        path=path,
        layer=layer,
        d_model=d_model,
        n_ov_heads=n_ov_heads,
        n_qk_heads=n_qk_heads,
        d_qk_head=d_qk_head,
        top_k=top_k,
        activation="topk_relu" if config.get("use_z_relu") else "topk_abs",
        attn_scale=float(attn_scale),
        rotary_dim=rotary_dim,
        rotary_adjacent_pairs=adjacent,
        rope_parameters=rope_parameters,
        use_qk_norm=False,
        qk_norm_eps=1e-6,
        tensors=tensors,
        input_is_normalized_residual=False,
        model_name=config.get("model_name"),
    )
    if config.get("use_z_relu"):
        lorsa.notes.append(
            "use_z_relu: heads selected on relu(z)*||W_O||; the paper-era code keeps signed z, which equals relu(z) "
            "on the selected heads whenever at least K heads have positive z"
        )
    if lorsa.model_name:
        lorsa.notes.append(f"trained on {lorsa.model_name!r} (as its config.json records)")
    _set_avg_norm(lorsa, config.get("avg_norm"), weights_already_folded)
    check_shapes(lorsa)
    check_rotary_buffers(lorsa, stored.get("rotary_sin"), stored.get("rotary_cos"))
    return lorsa


def _set_avg_norm(lorsa: ForeignLorsa, avg_norm: Any, weights_already_folded: bool) -> None:
    if avg_norm is None:
        lorsa.dataset_norm = "none recorded (avg_norm is null)"
        return
    if weights_already_folded:
        lorsa.dataset_norm = "already in the weights (declared with weights_already_folded); avg_norm ignored"
        return
    if not isinstance(avg_norm, dict) or set(avg_norm) != {"in", "out"}:
        raise CheckpointError(
            f"{lorsa.path}/config.json: avg_norm is {avg_norm!r}, expected {{'in': ..., 'out': ...}}."
        )
    for key in ("in", "out"):
        value = avg_norm[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise CheckpointError(
                f"{lorsa.path}/config.json: avg_norm[{key!r}] is {value!r}, expected a positive number."
            )
    lorsa.input_scale = math.sqrt(lorsa.d_model) / avg_norm["in"]
    lorsa.output_scale = math.sqrt(lorsa.d_model) / avg_norm["out"]
    lorsa.dataset_norm = f"avg_norm (in {avg_norm['in']:.6g}, out {avg_norm['out']:.6g}), folded into the weights"
