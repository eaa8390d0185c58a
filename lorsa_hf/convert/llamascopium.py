"""Reader for the current reference format (PyPI `llamascopium`, formerly `lm-saes`): `config.json` with
`sae_type: "lorsa"` and `sae_weights.safetensors`.

Conventions (docs/method.md §6): the input is TransformerLens' `blocks.L.ln1.hook_normalized`, the normalised
residual WITHOUT the norm's gain and bias; selection is TopK over `relu(z) * ||W_O||`; with
`norm_activation: "dataset-wise"` inputs were scaled by `sqrt(d) / norm_in` and outputs by `sqrt(d) / norm_out`
(the norms are scalars in the weights file); with `"inference"` those factors are already in the weights.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .foreign import (
    CheckpointError,
    ForeignLorsa,
    check_rotary_buffers,
    check_shapes,
    read_json_config,
    require,
    rotary_settings,
)

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "sae_weights.safetensors"
LM_CONFIG_FILE = "lm_config.json"
"""What llamascopium's `upload_to_hf` may write beside config.json: the language model it was trained on."""
_HOOK_IN = re.compile(r"^blocks\.(\d+)\.ln1\.hook_normalized$")
_HOOK_OUT = re.compile(r"^blocks\.(\d+)\.hook_attn_out$")
_NORM_PREFIX = "dataset_average_activation_norm."
_BUFFERS = {"mask", "IGNORE", "rotary_sin", "rotary_cos"}


def is_llamascopium_config(config: dict[str, Any]) -> bool:
    return "sae_type" in config


def layer_from_hooks(config: dict[str, Any], source: Path) -> int:
    hook_in = require(config, "hook_point_in", str, source)
    hook_out = require(config, "hook_point_out", str, source)
    match_in, match_out = _HOOK_IN.match(hook_in), _HOOK_OUT.match(hook_out)
    if match_in is None or match_out is None:
        raise CheckpointError(
            f"{source}: hook points {hook_in!r} -> {hook_out!r} are not supported; lorsa_hf imports Lorsas trained "
            "on 'blocks.L.ln1.hook_normalized' -> 'blocks.L.hook_attn_out' (an attention block's input and output)."
        )
    if match_in.group(1) != match_out.group(1):
        raise CheckpointError(f"{source}: hook points {hook_in!r} and {hook_out!r} name different layers.")
    return int(match_in.group(1))


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    file = path / WEIGHTS_FILE
    if not file.is_file():
        others = sorted(p.name for p in path.glob("sae_weights.*") if p.name != WEIGHTS_FILE)
        held = f"; it holds {others}, which lorsa_hf does not read (re-save it as safetensors)" if others else ""
        raise CheckpointError(
            f"{path} has a llamascopium config.json but no {WEIGHTS_FILE}{held}; every layer folder needs both: "
            "fetch the whole folder."
        )
    try:
        with safe_open(str(file), framework="pt") as weights:
            return {key: weights.get_tensor(key) for key in weights.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"Cannot read {file} ({error}): the file is corrupt or truncated.") from error


def read_llamascopium(path: Path, weights_already_folded: bool = False) -> ForeignLorsa:
    """Read one llamascopium Lorsa folder.

    Args:
        weights_already_folded: The weights already include the dataset-wise normalisation factors although
            config.json says `"dataset-wise"` (the folder a finished llamascopium training run writes); the stored
            norms are then ignored instead of being applied a second time.
    """
    config = read_json_config(path)
    sae_type = config.get("sae_type")
    if sae_type != "lorsa":
        raise CheckpointError(f"{path} holds a llamascopium {sae_type!r} sparse dictionary, not a Lorsa.")
    layer = layer_from_hooks(config, path)
    d_model = require(config, "d_model", int, path)
    expansion_factor = require(config, "expansion_factor", (int, float), path)
    n_ov_heads = int(d_model * expansion_factor)
    n_qk_heads = require(config, "n_qk_heads", int, path)
    d_qk_head = require(config, "d_qk_head", int, path)
    top_k = require(config, "top_k", int, path)

    act_fn = config.get("act_fn", "relu")
    if act_fn != "topk":
        raise CheckpointError(
            f"{path}: act_fn {act_fn!r} is not supported; lorsa_hf imports per-token TopK Lorsas (act_fn 'topk'). "
            "A BatchTopK or JumpReLU Lorsa selects a varying number of heads per token, which this layer does not do."
        )
    use_qk_norm = bool(config.get("use_post_qk_ln", False))
    if use_qk_norm and config.get("normalization_type") != "RMS":
        raise CheckpointError(
            f"{path}: use_post_qk_ln with normalization_type {config.get('normalization_type')!r} is not supported "
            "(only per-head RMS norm, normalization_type 'RMS')."
        )
    rotary_dim, adjacent, rope_parameters = rotary_settings(config, d_qk_head, path)
    attn_scale = config.get("attn_scale")
    attn_scale = math.sqrt(d_qk_head) if attn_scale is None else attn_scale

    stored = _read_tensors(path)
    tensors = _our_tensors(path, config, stored, use_qk_norm, d_model)
    _check_decoder_norm_selection(path, config, tensors["W_O"])

    lorsa = ForeignLorsa(
        format="llamascopium",
        path=path,
        layer=layer,
        d_model=d_model,
        n_ov_heads=n_ov_heads,
        n_qk_heads=n_qk_heads,
        d_qk_head=d_qk_head,
        top_k=top_k,
        activation="topk_relu",
        attn_scale=float(attn_scale),
        rotary_dim=rotary_dim,
        rotary_adjacent_pairs=adjacent,
        rope_parameters=rope_parameters,
        use_qk_norm=use_qk_norm,
        qk_norm_eps=float(config.get("eps", 1e-6)),
        tensors=tensors,
        input_is_normalized_residual=True,
    )
    if isinstance(config.get("n_ctx"), int):
        lorsa.notes.append(
            f"trained on contexts of {config['n_ctx']} tokens (the reference implementation runs no longer ones); "
            "the converted layer runs any length, beyond n_ctx untested by training"
        )
    _read_lm_config(lorsa)
    _set_dataset_norm(lorsa, config, stored, weights_already_folded)
    check_shapes(lorsa)
    check_rotary_buffers(lorsa, stored.get("rotary_sin"), stored.get("rotary_cos"))
    return lorsa


def _read_lm_config(lorsa: ForeignLorsa) -> None:
    """The language model recorded in lm_config.json, when the folder has one, as a note of the report.

    Read as plain JSON: llamascopium's own reader of this file (`LanguageModelConfig.from_pretrained_sae`) looks in
    the wrong place."""
    file = lorsa.path / LM_CONFIG_FILE
    if not file.is_file():
        return
    try:
        lm_config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file} is not valid JSON ({error}); fix or delete it (it is only metadata).") from error
    name = lm_config.get("model_name") if isinstance(lm_config, dict) else None
    if isinstance(name, str) and name:
        lorsa.model_name = name
        lorsa.notes.append(f"trained on {name!r} (as its {LM_CONFIG_FILE} records)")


def _our_tensors(
    path: Path, config: dict[str, Any], stored: dict[str, torch.Tensor], use_qk_norm: bool, d_model: int
) -> dict[str, torch.Tensor]:
    """The stored tensors under our parameter names; refuses missing ones and ones the config does not explain."""
    names = {"W_Q": "W_Q", "b_Q": "b_Q", "W_K": "W_K", "b_K": "b_K", "W_V": "W_V", "b_V": "b_V", "W_O": "W_O"}
    if config.get("use_decoder_bias", True):
        names["b_O"] = "b_D"
    if use_qk_norm:
        names.update(q_norm_weight="ln_q.w", k_norm_weight="ln_k.w")
    missing = sorted(theirs for theirs in names.values() if theirs not in stored)
    if missing:
        raise CheckpointError(f"{path / WEIGHTS_FILE} lacks {missing}; the file is truncated or from another model.")
    unexpected = sorted(
        key for key in stored if key not in names.values() and key not in _BUFFERS and not key.startswith(_NORM_PREFIX)
    )
    if unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS_FILE} holds {unexpected}, which its config.json does not account for "
            "(e.g. QK-norm weights with use_post_qk_ln false); config and weights do not belong together."
        )
    tensors = {ours: stored[theirs] for ours, theirs in names.items()}
    if "b_O" not in tensors:
        tensors["b_O"] = torch.zeros(d_model, dtype=tensors["W_O"].dtype)
    return tensors


def _check_decoder_norm_selection(path: Path, config: dict[str, Any], W_O: torch.Tensor) -> None:
    """A TopK over relu(z) alone equals ours (weighted by ||W_O||) only when every decoder row has the same norm."""
    if config.get("sparsity_include_decoder_norm", True):
        return
    norms = W_O.double().norm(dim=-1)
    if not torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-5):
        raise CheckpointError(
            f"{path}: sparsity_include_decoder_norm is false (TopK over relu(z) alone) and the decoder rows have "
            "different norms; lorsa_hf always weights the selection by ||W_O||, so this Lorsa cannot be imported "
            "exactly."
        )


def _set_dataset_norm(
    lorsa: ForeignLorsa, config: dict[str, Any], stored: dict[str, torch.Tensor], weights_already_folded: bool
) -> None:
    """Input/output scale factors from `norm_activation` and the stored norms, never applied twice."""
    mode = config.get("norm_activation", "dataset-wise")
    if mode == "inference":
        lorsa.dataset_norm = "already in the weights (norm_activation 'inference'); stored norms ignored"
        return
    if mode != "dataset-wise":
        raise CheckpointError(
            f"{lorsa.path}: norm_activation {mode!r} normalises each token or batch by its own norm, which no fixed "
            "weights can reproduce; only 'dataset-wise' and 'inference' checkpoints can be converted."
        )
    if weights_already_folded:
        lorsa.dataset_norm = (
            "already in the weights (declared with weights_already_folded; config.json says 'dataset-wise'); "
            "stored norms ignored"
        )
        return
    norms = []
    for hook in (config["hook_point_in"], config["hook_point_out"]):
        key = _NORM_PREFIX + hook
        if key not in stored:
            raise CheckpointError(
                f"{lorsa.path}: norm_activation is 'dataset-wise' but {WEIGHTS_FILE} lacks {key!r}; without it the "
                "scale of the weights is unknown."
            )
        norm = stored[key].double()
        if norm.numel() != 1 or not (torch.isfinite(norm).all() and norm.item() > 0):
            raise CheckpointError(f"{lorsa.path}: {key} is {norm.tolist()}, expected one positive number.")
        norms.append(norm.item())
    lorsa.input_scale, lorsa.output_scale = (math.sqrt(lorsa.d_model) / norm for norm in norms)
    lorsa.dataset_norm = f"dataset-wise (average norms: in {norms[0]:.6g}, out {norms[1]:.6g}), folded into the weights"
    logger.warning(
        "%s: config.json says norm_activation 'dataset-wise', so the stored norms are folded into the weights. If "
        "this folder is the output of a finished llamascopium training run, its weights are already folded and its "
        "config.json was written before training: convert it with weights_already_folded=True "
        "(--weights-already-folded) instead, or the norms are applied twice.",
        lorsa.path,
    )
