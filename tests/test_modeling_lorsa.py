"""The Lorsa layer computes exactly docs/method.md §1, spliced into real transformers models."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lorsa_hf import LorsaConfig, LorsaForReplacement
from lorsa_hf.adapters import get_adapter
from tests.conftest import VOCAB, make_base, make_lorsa
from tests.reference import reference_lorsa

LAYER = 1


def spliced_call(model, layer: int, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    """Run `model` and return what its (spliced) attention module at `layer` received and returned."""
    module = get_adapter(model).get_attention(model, layer)
    seen = {}

    def pre_hook(mod, args, kwargs):
        seen["hidden_states"] = args[0] if args else kwargs["hidden_states"]
        seen["position_embeddings"] = kwargs.get("position_embeddings")

    def hook(mod, args, kwargs, output):
        seen["output"] = output[0]

    handles = [
        module.register_forward_pre_hook(pre_hook, with_kwargs=True),
        module.register_forward_hook(hook, with_kwargs=True),
    ]
    try:
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def causal_allowed(attention_mask: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[B, T] padding mask -> [B, T, T]: query s reads key t when t <= s (and s - t < window when the base model
    has a sliding window) and t is a real token."""
    seq = attention_mask.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    if window is not None:
        causal = causal.triu(1 - window)
    return causal[None] & attention_mask.bool()[:, None, :]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def spliced_and_reference(model, lorsa, seq_len: int, seed: int, rotary=None):
    """Run the spliced `model` on a random batch; return what its layer-LAYER Lorsa received and returned, and
    the float64 reference (output, z, a) for the same input, with the base model's (cos, sin) unless given."""
    input_ids = torch.randint(3, VOCAB, (2, seq_len), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(input_ids)
    seen = spliced_call(model, LAYER, input_ids, mask)
    cos, sin = rotary if rotary is not None else seen["position_embeddings"]
    params = dict(lorsa.layer(LAYER).named_parameters())
    allowed = causal_allowed(mask, get_adapter(model).sliding_window(model.config, LAYER))
    return seen, reference_lorsa(seen["hidden_states"], params, lorsa.config, cos, sin, allowed)


@pytest.mark.parametrize("activation", ["topk_abs", "topk_relu"])
@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_spliced_output_equals_dense_reference(arch, activation, dtype, tolerance):
    model = make_base(arch, dtype=dtype)
    lorsa = make_lorsa(model.config, [LAYER], activation=activation, dtype=dtype)
    lorsa.splice(model)
    seen, (expected, z, a) = spliced_and_reference(model, lorsa, seq_len=12, seed=1)
    assert relative_error(seen["output"], expected) <= tolerance
    window = get_adapter(model).sliding_window(model.config, LAYER)  # Mistral's, as the mask the model built
    mask = causal_allowed(torch.ones(2, 12, dtype=torch.long), window)[:, None]
    out = lorsa.layer(LAYER)(
        seen["hidden_states"], position_embeddings=seen["position_embeddings"], attention_mask=mask,
        output_activations=True,
    )
    assert relative_error(out.z, z) <= tolerance
    assert relative_error(out.activations(), a) <= tolerance
    assert torch.equal(out.activations() != 0, a != 0)  # the same heads are selected
    assert ((out.activations() != 0).sum(-1) == lorsa.config.top_k).all()


def test_the_sliding_window_of_the_base_model_bounds_what_the_lorsa_reads():
    """Mistral's window (5 tokens) reaches the spliced Lorsa through the mask: its output is the windowed
    reference, far from the full-causal one, in eager and sdpa alike."""
    for implementation in ("eager", "sdpa"):
        model = make_base("mistral", dtype=torch.float64, attn_implementation=implementation)
        lorsa = make_lorsa(model.config, [LAYER], dtype=torch.float64)
        lorsa.splice(model)
        seen, (expected, _, _) = spliced_and_reference(model, lorsa, seq_len=12, seed=6)
        assert relative_error(seen["output"], expected) <= 1e-10
        cos, sin = seen["position_embeddings"]
        params = dict(lorsa.layer(LAYER).named_parameters())
        full = causal_allowed(torch.ones(2, 12, dtype=torch.long))
        unwindowed, _, _ = reference_lorsa(seen["hidden_states"], params, lorsa.config, cos, sin, full)
        assert relative_error(seen["output"], unwindowed) > 0.05


def test_own_rotary_when_d_qk_differs_from_the_base_head_dim():
    """d_qk 32 on a base with head dim 16: the Lorsa rotates all 32 dims with llama3-scaled frequencies itself."""
    model = make_base("llama")
    lorsa = make_lorsa(model.config, [LAYER], d_qk_head=32)
    assert lorsa.config.rotary_dim == 32
    lorsa.splice(model)

    rope = model.config.rope_parameters  # llama3 frequency scaling written out from its definition
    dim = 32
    inv_freq = 1.0 / rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    wavelen = 2 * math.pi / inv_freq
    old = rope["original_max_position_embeddings"]
    low, high, factor = old / rope["low_freq_factor"], old / rope["high_freq_factor"], rope["factor"]
    smooth = (old / wavelen - rope["low_freq_factor"]) / (rope["high_freq_factor"] - rope["low_freq_factor"])
    scaled = torch.where(wavelen > low, inv_freq / factor, inv_freq)
    medium = (wavelen >= high) & (wavelen <= low)
    inv_freq = torch.where(medium, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    angles = torch.arange(20, dtype=torch.float64)[:, None] * inv_freq
    cos = torch.cat([angles.cos(), angles.cos()], -1).expand(2, -1, -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1).expand(2, -1, -1)

    seen, (expected, _, _) = spliced_and_reference(model, lorsa, seq_len=20, seed=2, rotary=(cos, sin))
    assert relative_error(seen["output"], expected) <= 1e-5


@pytest.mark.parametrize("adjacent_pairs", [False, True])
def test_qk_norm_and_rotary_pairing(adjacent_pairs):
    model = make_base("gpt_neox", dtype=torch.float64)
    lorsa = make_lorsa(
        model.config, [LAYER], dtype=torch.float64, use_qk_norm=True, qk_norm_eps=1e-5,
        rotary_adjacent_pairs=adjacent_pairs,
    )
    lorsa.splice(model)
    seen, (expected, _, _) = spliced_and_reference(model, lorsa, seq_len=10, seed=3)
    assert relative_error(seen["output"], expected) <= 1e-10


def test_standalone_forward_equals_the_spliced_layer(arch):
    """Standalone, the mask defaults to plain causal; a sliding-window base's mask (Mistral) is passed in."""
    model = make_base(arch, dtype=torch.float64)
    lorsa = make_lorsa(model.config, [LAYER], dtype=torch.float64)
    lorsa.splice(model)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    seen = spliced_call(model, LAYER, input_ids)
    window = get_adapter(model).sliding_window(model.config, LAYER)
    mask = None if window is None else causal_allowed(torch.ones(2, 10, dtype=torch.long), window)[:, None]
    out = lorsa(seen["hidden_states"], attention_mask=mask)
    torch.testing.assert_close(out.hidden_states, seen["output"], rtol=0, atol=1e-12)
    assert out.z.shape == (2, 10, lorsa.config.n_ov_heads)
    assert out.top_k_indices.shape == (2, 10, lorsa.config.top_k)


def test_bfloat16_runs_with_exactly_k_active_heads(arch):
    model = make_base(arch, dtype=torch.bfloat16)
    lorsa = make_lorsa(model.config, [LAYER], dtype=torch.bfloat16)
    lorsa.splice(model)
    input_ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    seen = spliced_call(model, LAYER, input_ids)
    assert seen["output"].dtype == torch.bfloat16 and seen["output"].isfinite().all()
    out = lorsa(seen["hidden_states"])
    assert ((out.activations() != 0).sum(-1) == lorsa.config.top_k).all()
    reference = make_lorsa(model.config, [LAYER], dtype=torch.float32)(seen["hidden_states"].float())
    assert (out.z.float() - reference.z).norm() / reference.z.norm() < 0.02
    # Near-tied heads may swap in bfloat16; where the selected set is the same, so is the prediction.
    same = ((out.activations() != 0) == (reference.activations() != 0)).all(-1)
    assert same.float().mean() > 0.7
    error = (out.hidden_states.float() - reference.hidden_states)[same].norm() / reference.hidden_states[same].norm()
    assert error < 0.02


def test_top_k_can_be_overridden_per_call():
    model = make_base("llama")
    lorsa = make_lorsa(model.config, [LAYER])
    x = torch.randn(1, 6, 64)
    assert ((lorsa(x, top_k=32).activations() != 0).sum(-1) == 32).all()
    with pytest.raises(ValueError, match="top_k"):
        lorsa(x, top_k=129)


def test_k_equal_to_n_ov_keeps_every_head():
    model = make_base("gpt_neox", dtype=torch.float64)
    lorsa = make_lorsa(model.config, [LAYER], dtype=torch.float64, top_k=128)
    x = torch.randn(2, 7, 64, dtype=torch.float64)
    out = lorsa(x)
    torch.testing.assert_close(out.activations(), out.z, rtol=0, atol=0)
    torch.testing.assert_close(out.hidden_states, out.z @ lorsa.layer(LAYER).W_O + lorsa.layer(LAYER).b_O)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return result


def test_no_tensor_of_size_tokens_by_heads_by_d():
    model = make_base("llama")
    lorsa = make_lorsa(model.config, [LAYER], n_ov_heads=512, top_k=16)
    x = torch.randn(2, 16, 64, requires_grad=True)
    with _LargestTensor() as probe:
        lorsa(x).hidden_states.sum().backward()
    tokens_heads_d = 2 * 16 * 512 * 64
    assert probe.largest < tokens_heads_d / 8


def test_forward_refuses_wrong_shape_and_dtype():
    lorsa = make_lorsa(make_base("llama").config, [LAYER])
    with pytest.raises(ValueError, match=r"\[batch, seq, 64\]"):
        lorsa(torch.randn(1, 4, 32))
    with pytest.raises(TypeError, match="float64"):
        lorsa(torch.randn(1, 4, 64, dtype=torch.float64))
    two = make_lorsa(make_base("llama").config, [0, 1])
    with pytest.raises(ValueError, match="layer="):
        two(torch.randn(1, 4, 64))
    with pytest.raises(KeyError, match="not layer 2"):
        two(torch.randn(1, 4, 64), layer=2)


def test_parameter_names_and_shapes_are_the_public_format():
    config = LorsaConfig.from_base_config(make_base("llama").config, layers=[0, 2], n_ov_heads=128, use_qk_norm=True)
    shapes = {name: tuple(p.shape) for name, p in LorsaForReplacement(config).named_parameters()}
    n_qk, d, d_qk, n_ov = 4, 64, 16, 128
    for layer in (0, 2):
        assert shapes[f"layers.{layer}.W_Q"] == (n_qk, d, d_qk)
        assert shapes[f"layers.{layer}.b_Q"] == (n_qk, d_qk)
        assert shapes[f"layers.{layer}.W_K"] == (n_qk, d, d_qk)
        assert shapes[f"layers.{layer}.b_K"] == (n_qk, d_qk)
        assert shapes[f"layers.{layer}.W_V"] == (n_ov, d)
        assert shapes[f"layers.{layer}.b_V"] == (n_ov,)
        assert shapes[f"layers.{layer}.W_O"] == (n_ov, d)
        assert shapes[f"layers.{layer}.b_O"] == (d,)
        assert shapes[f"layers.{layer}.q_norm_weight"] == (n_qk, d_qk)
        assert shapes[f"layers.{layer}.k_norm_weight"] == (n_qk, d_qk)
    assert len(shapes) == 20
