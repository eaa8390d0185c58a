"""Initialisation of a Lorsa before training (docs/method.md §3): random, or from the base model's heads.

Every draw uses a generator seeded from (seed, layer), so a layer starts from the same weights whether one
process trains all layers or each process trains a share of them.
"""

from __future__ import annotations

import math

import torch
from transformers import PreTrainedModel

from ..adapters import AttentionWeights, get_adapter
from ..modeling_lorsa import LorsaForReplacement, LorsaLayer
from .recipe import InitSection

# What must agree between a saved Lorsa and the recipe's for training to continue from it; `top_k` may change.
_SAME_GEOMETRY = (
    "base_model_type", "hidden_size", "n_ov_heads", "n_qk_heads", "d_qk_head", "activation", "attn_scale",
    "rotary_dim", "rotary_adjacent_pairs", "rope_parameters", "use_qk_norm", "qk_norm_eps",
)


def layer_generator(seed: int, layer: int) -> torch.Generator:
    """The generator a layer's initialisation draws from."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer)


@torch.no_grad()
def random_init(layer: LorsaLayer, generator: torch.Generator) -> None:
    """Encoders and decoder rows N(0, 1/d), biases zero, q/k norm gains one."""
    std = 1.0 / math.sqrt(layer.config.hidden_size)
    for weight in (layer.W_Q, layer.W_K, layer.W_V, layer.W_O):
        weight.copy_(torch.randn(weight.shape, generator=generator) * std)
    for bias in (layer.b_Q, layer.b_K, layer.b_V, layer.b_O):
        bias.zero_()
    if layer.config.use_qk_norm:
        layer.q_norm_weight.fill_(1.0)
        layer.k_norm_weight.fill_(1.0)


def _on_device(weights: AttentionWeights, device: torch.device) -> AttentionWeights:
    moved = {name: None if value is None else value.to(device) for name, value in vars(weights).items()}
    return AttentionWeights(**moved)


def _base_head_of_group(n_qk: int, n_heads: int) -> list[int]:
    """Base head each QK group copies: h * n_heads // n_qk (= h // (n_qk / n_heads) when n_qk >= n_heads)."""
    return [h * n_heads // n_qk for h in range(n_qk)]


def _check_qk_compatible(layer: LorsaLayer, model: PreTrainedModel) -> None:
    config = layer.config
    base = get_adapter(model).describe(model.config)
    problems = []
    if config.d_qk_head != base.head_dim:
        problems.append(f"lorsa.d_qk_head is {config.d_qk_head} but the base head dimension is {base.head_dim}")
    if config.rotary_dim != base.rotary_dim:
        problems.append(f"lorsa.rotary_dim is {config.rotary_dim} but the base model rotates {base.rotary_dim} dims")
    if not math.isclose(config.attn_scale, math.sqrt(base.head_dim)):
        problems.append(f"lorsa.attn_scale is {config.attn_scale} but the base model scales by sqrt({base.head_dim})")
    if config.use_qk_norm and base.qk_norm_eps is None:
        problems.append("lorsa.use_qk_norm is set but the base attention has no q/k norm")
    if base.qk_norm_eps is not None and not config.use_qk_norm:
        problems.append("the base attention normalises q and k but lorsa.use_qk_norm is false")
    if base.qk_norm_eps is not None and config.use_qk_norm and config.qk_norm_eps != base.qk_norm_eps:
        problems.append(f"lorsa.qk_norm_eps is {config.qk_norm_eps} but the base q/k norm's eps is {base.qk_norm_eps}")
    if problems:
        raise ValueError(
            "init.qk 'base' copies the base model's query/key heads, which needs the same head geometry: "
            + "; ".join(problems) + ". Fix the lorsa settings or use init.qk: random."
        )


@torch.no_grad()
def copy_base_qk(layer: LorsaLayer, model: PreTrainedModel) -> None:
    """QK group h takes the query/key weights (and biases) of base head h * n_heads // n_qk; the key head is
    the one that base query head reads under grouped-query attention. A base q/k norm (one gain shared by the
    heads, Qwen3) becomes every group's QK-norm gain."""
    _check_qk_compatible(layer, model)
    weights = _on_device(get_adapter(model).attention_weights(model, layer.layer_idx), layer.W_Q.device)
    n_heads, n_kv = weights.q.shape[0], weights.k.shape[0]
    heads = _base_head_of_group(layer.config.n_qk_heads, n_heads)
    kv_heads = [j // (n_heads // n_kv) for j in heads]
    layer.W_Q.copy_(weights.q[heads])
    layer.W_K.copy_(weights.k[kv_heads])
    layer.b_Q.copy_(weights.q_bias[heads] if weights.q_bias is not None else torch.zeros_like(layer.b_Q))
    layer.b_K.copy_(weights.k_bias[kv_heads] if weights.k_bias is not None else torch.zeros_like(layer.b_K))
    if weights.q_norm is not None:
        layer.q_norm_weight.copy_(weights.q_norm.expand_as(layer.q_norm_weight))
        layer.k_norm_weight.copy_(weights.k_norm.expand_as(layer.k_norm_weight))


@torch.no_grad()
def init_ov_from_base(layer: LorsaLayer, model: PreTrainedModel, generator: torch.Generator) -> None:
    """Each head of QK group h gets a rank-1 piece of the OV circuit of the base head h came from.

    For base head j with value map V_j [d, hd] and output map O_j [hd, d], the g heads of a group take rows
    u_i of a random Parseval frame (sum_i u_i u_i^T = I when g >= hd): W_V[i] = V_j u_i, W_O[i] = u_i O_j.
    With every head active the group reproduces that base head exactly (groups sharing a base head split it).
    """
    config = layer.config
    weights = _on_device(get_adapter(model).attention_weights(model, layer.layer_idx), layer.W_V.device)
    n_heads, n_kv, head_dim = weights.q.shape[0], weights.v.shape[0], weights.v.shape[-1]
    g = config.ov_group_size
    heads = _base_head_of_group(config.n_qk_heads, n_heads)
    shares = {j: heads.count(j) for j in set(heads)}
    for group, j in enumerate(heads):
        kv = j // (n_heads // n_kv)
        frame, _ = torch.linalg.qr(torch.randn(max(g, head_dim), min(g, head_dim), generator=generator))
        u = ((frame if g >= head_dim else frame.t()) / math.sqrt(shares[j])).to(layer.W_V.device)  # [g, hd]
        rows = slice(group * g, (group + 1) * g)
        layer.W_V[rows] = u @ weights.v[kv].t()
        layer.W_O[rows] = u @ weights.o[j]
        layer.b_V[rows] = u @ weights.v_bias[kv] if weights.v_bias is not None else 0.0


@torch.no_grad()
def calibrate_output(
    layer: LorsaLayer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    attention_mask: torch.Tensor,
    match_norm: bool,
    set_bias: bool,
    top_k: int,
) -> None:
    """On calibration tokens: rescale W_O so the mean output norm matches the mean centred target norm, then set
    b_O to the mean of what the heads leave unexplained (the mean target when they explain nothing)."""
    layer.b_O.zero_()
    output = layer(inputs, attention_mask=attention_mask, top_k=top_k).hidden_states[mask].double()
    target = targets[mask].double()
    if match_norm:
        output_norm = output.norm(dim=-1).mean()
        target_norm = (target - target.mean(0)).norm(dim=-1).mean()
        if output_norm > 0:
            scale = target_norm / output_norm
            layer.W_O.mul_(scale.to(layer.W_O.dtype))
            output = output * scale
    if set_bias:
        layer.b_O.copy_((target - output).mean(0).to(layer.b_O.dtype))


def freeze_qk(layer: LorsaLayer) -> None:
    """Keep the query/key side fixed during training."""
    for name in ("W_Q", "W_K", "b_Q", "b_K", "q_norm_weight", "k_norm_weight"):
        parameter = getattr(layer, name, None)
        if parameter is not None:
            parameter.requires_grad_(False)


def load_start(source: str, lorsa: LorsaForReplacement) -> LorsaForReplacement:
    """The saved Lorsa `init.from_pretrained` names, checked against the one being trained: same base model,
    every trained layer present, the same geometry. Refuses with what differs rather than starting elsewhere."""
    start = LorsaForReplacement.from_pretrained(source)
    wanted, found = lorsa.config, start.config
    problems = [
        f"{key} is {getattr(found, key)!r} there but {getattr(wanted, key)!r} in the recipe"
        for key in _SAME_GEOMETRY if getattr(found, key) != getattr(wanted, key)
    ]
    missing = [layer for layer in wanted.layers if layer not in found.layers]
    if missing:
        problems.append(f"it has no layer {missing} (it replaces layers {found.layers})")
    names = (found.base_model_name_or_path, wanted.base_model_name_or_path)
    if None not in names and names[0] != names[1]:
        problems.append(f"it was trained on {names[0]!r}, the recipe's model is {names[1]!r}")
    if problems:
        raise ValueError(
            f"init.from_pretrained={source!r} cannot start this run: " + "; ".join(problems)
            + ". Match the recipe's lorsa and model sections to it, or start from the base model (unset it)."
        )
    return start


def continue_layer(layer: LorsaLayer, start: LorsaForReplacement, options: InitSection) -> None:
    """Take one layer's weights from a saved Lorsa (cast to this layer's dtype); then `freeze_qk`."""
    with torch.no_grad():
        layer.load_state_dict(start.layer(layer.layer_idx).state_dict())
    if options.freeze_qk:
        freeze_qk(layer)


def initialize_layer(
    layer: LorsaLayer,
    options: InitSection,
    model: PreTrainedModel,
    seed: int,
    calibration: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    top_k: int,
) -> None:
    """Apply the recipe's `init` section to one layer. `calibration` is (inputs, targets, loss mask, attention
    mask) of a few sequences, needed by `b_o: mean` and `match_norm`; `top_k` is the K of the first step."""
    generator = layer_generator(seed, layer.layer_idx)
    random_init(layer, generator)
    if options.qk == "base":
        copy_base_qk(layer, model)
    if options.ov == "base":
        init_ov_from_base(layer, model, generator)
    if options.match_norm or options.b_o == "mean":
        if calibration is None:
            raise ValueError("init.b_o 'mean' and init.match_norm need calibration activations.")
        inputs, targets, mask, attention_mask = calibration
        calibrate_output(layer, inputs, targets, mask, attention_mask, options.match_norm, options.b_o == "mean", top_k)
    if options.freeze_qk:
        freeze_qk(layer)


__all__ = [
    "calibrate_output", "continue_layer", "copy_base_qk", "freeze_qk", "init_ov_from_base", "initialize_layer",
    "layer_generator", "load_start", "random_init",
]
