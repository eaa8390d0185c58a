"""Relations R1-R5 of the fixtures README: the converted Lorsa, spliced into the Hugging Face model, reproduces
what llamascopium (both saved variants, and the trap) and the paper-era code computed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorsa_hf import LorsaForReplacement, convert_checkpoint

from .conftest import FIXTURE_ARCHITECTURES, LAYER, LLAMASCOPIUM_VARIANTS

ATOL = 1e-4


def _run(lorsa: LorsaForReplacement, hf_attn_in: torch.Tensor):
    with torch.no_grad():
        return lorsa(hf_attn_in, layer=LAYER, output_activations=True)


def _assert_active_set(output, recorded_acts: torch.Tensor) -> None:
    """The K selected heads per token are exactly the recorded nonzero ones."""
    ours = torch.zeros_like(recorded_acts, dtype=torch.bool).scatter(-1, output.top_k_indices, True)
    assert torch.equal(ours, recorded_acts != 0)


def _spliced_logits(lorsa, base, tokens, keep_bos_from: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of `base` with the Lorsa in place of layer LAYER's attention; with `keep_bos_from`, the attention
    output at BOS positions is that tensor's instead (llamascopium's DownstreamMetric splices non-BOS only)."""
    lorsa.splice(base)
    try:
        handle = None
        if keep_bos_from is not None:
            attention = base.get_decoder().layers[LAYER]
            module = attention.attention if hasattr(attention, "attention") else attention.self_attn

            def keep_bos(_module, _args, output):
                hidden = output[0].clone()
                hidden[:, 0] = keep_bos_from[:, 0]  # position 0 is the only BOS in the fixture tokens
                return (hidden, *output[1:])

            handle = module.register_forward_hook(keep_bos)
        with torch.no_grad():
            logits = base(tokens).logits
        if handle is not None:
            handle.remove()
    finally:
        lorsa.unsplice(base)
    return logits


@pytest.mark.parametrize("variant", LLAMASCOPIUM_VARIANTS)
@pytest.mark.parametrize("arch", FIXTURE_ARCHITECTURES)
def test_llamascopium_r1_to_r4(fixtures: Path, io, bases, arch: str, variant: str) -> None:
    recorded, base = io[arch], bases[arch]
    conversion = convert_checkpoint(fixtures / arch / variant, base)
    lorsa = conversion.lorsa
    assert lorsa.config.layers == [LAYER] and lorsa.config.activation == "topk_relu"

    output = _run(lorsa, recorded["hf_attn_in"])
    # R1: the recorded output exactly, no centring needed
    torch.testing.assert_close(output.hidden_states, recorded["lorsa_out_llamascopium"], atol=ATOL, rtol=0)
    # R2: same active set, activations in normalised units
    _assert_active_set(output, recorded["lorsa_acts"])
    torch.testing.assert_close(output.activations(), recorded["lorsa_acts"], atol=ATOL, rtol=0)

    # R3: spliced logits, raw and through log_softmax against TransformerLens
    logits = _spliced_logits(lorsa, base, recorded["tokens"])
    torch.testing.assert_close(logits, recorded["hf_spliced_logits"], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits.log_softmax(-1), recorded["spliced_logits"].log_softmax(-1), atol=ATOL, rtol=0)
    # R4: spliced at non-BOS positions only
    logits = _spliced_logits(lorsa, base, recorded["tokens"], keep_bos_from=recorded["hf_attn_out"])
    torch.testing.assert_close(
        logits.log_softmax(-1), recorded["spliced_logits_nonbos"].log_softmax(-1), atol=ATOL, rtol=0
    )

    layer_report = conversion.report.layers[0]
    assert layer_report.source_format == "llamascopium" and layer_report.top_k == 8
    if variant.endswith("unfolded"):
        assert layer_report.input_scale != 1.0 and "dataset-wise" in layer_report.dataset_norm
    else:
        assert layer_report.input_scale == layer_report.output_scale == 1.0


def _finished_run_folder(fixtures: Path, arch: str, target: Path) -> Path:
    """What a finished llamascopium training run leaves: folded weights next to the 'dataset-wise' config."""
    target.mkdir()
    shutil.copyfile(fixtures / arch / "lorsa_llamascopium_unfolded" / "config.json", target / "config.json")
    shutil.copyfile(
        fixtures / arch / "lorsa_llamascopium_folded" / "sae_weights.safetensors", target / "sae_weights.safetensors"
    )
    assert json.loads((target / "config.json").read_text())["norm_activation"] == "dataset-wise"
    return target


@pytest.mark.parametrize("arch", FIXTURE_ARCHITECTURES)
def test_trap_finished_run_needs_explicit_option(fixtures: Path, io, bases, arch: str, tmp_path: Path) -> None:
    recorded = io[arch]
    folder = _finished_run_folder(fixtures, arch, tmp_path / "finished_run")
    expected = recorded["lorsa_out_llamascopium"]

    declared = convert_checkpoint(folder, bases[arch], weights_already_folded=True)
    output = _run(declared.lorsa, recorded["hf_attn_in"])
    torch.testing.assert_close(output.hidden_states, expected, atol=ATOL, rtol=0)
    _assert_active_set(output, recorded["lorsa_acts"])
    assert declared.report.layers[0].input_scale == 1.0
    assert "weights_already_folded" in declared.report.layers[0].dataset_norm

    # Without the option the files read as an unfolded checkpoint and the norms apply twice (README: ~0.45).
    naive = _run(convert_checkpoint(folder, bases[arch]).lorsa, recorded["hf_attn_in"]).hidden_states
    relative_error = ((naive - expected).norm() / expected.norm()).item()
    assert relative_error > 0.3


def test_paper_era_r5(fixtures: Path, io, bases) -> None:
    recorded, base = io["gpt_neox"], bases["gpt_neox"]
    conversion = convert_checkpoint(fixtures / "gpt_neox" / "lorsa_paper_era", base)
    lorsa = conversion.lorsa
    assert lorsa.config.activation == "topk_abs" and lorsa.config.attn_scale == 4.0

    output = _run(lorsa, recorded["hf_attn_in"])
    torch.testing.assert_close(output.hidden_states, recorded["lorsa_out_paper_era"], atol=ATOL, rtol=0)
    _assert_active_set(output, recorded["lorsa_acts_paper_era"])
    torch.testing.assert_close(output.activations(), recorded["lorsa_acts_paper_era"], atol=ATOL, rtol=0)
    assert (output.top_k_values < 0).any(), "signed z is kept in topk_abs mode"

    logits = _spliced_logits(lorsa, base, recorded["tokens"])
    torch.testing.assert_close(logits, recorded["hf_spliced_logits_paper_era"], atol=ATOL, rtol=0)

    layer_report = conversion.report.layers[0]
    assert layer_report.source_format == "paper_era" and "not folded" in layer_report.input_norm_folded


def test_spliced_input_is_the_recorded_attention_input(io, bases) -> None:
    """The fixture base models load here as they were recorded: layer LAYER's attention sees `hf_attn_in`."""
    seen = {}

    def record(_module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    for arch, base in bases.items():
        layer = base.get_decoder().layers[LAYER]
        module = layer.attention if hasattr(layer, "attention") else layer.self_attn
        handle = module.register_forward_pre_hook(record, with_kwargs=True)
        with torch.no_grad():
            base(io[arch]["tokens"])
        handle.remove()
        torch.testing.assert_close(seen["x"], io[arch]["hf_attn_in"], atol=ATOL, rtol=0)


def test_from_pretrained_converts_foreign_folders_on_the_fly(fixtures: Path, io, bases) -> None:
    recorded = io["gpt_neox"]
    by_model = LorsaForReplacement.from_pretrained(
        fixtures / "gpt_neox" / "lorsa_llamascopium_unfolded", base_model=bases["gpt_neox"]
    )
    by_path = LorsaForReplacement.from_pretrained(
        fixtures / "gpt_neox" / "lorsa_paper_era", base_model=fixtures / "base" / "gpt_neox"
    )
    torch.testing.assert_close(
        _run(by_model, recorded["hf_attn_in"]).hidden_states, recorded["lorsa_out_llamascopium"], atol=ATOL, rtol=0
    )
    torch.testing.assert_close(
        _run(by_path, recorded["hf_attn_in"]).hidden_states, recorded["lorsa_out_paper_era"], atol=ATOL, rtol=0
    )
    with pytest.raises(ValueError, match="needs the base model"):
        LorsaForReplacement.from_pretrained(fixtures / "llama" / "lorsa_llamascopium_folded")
