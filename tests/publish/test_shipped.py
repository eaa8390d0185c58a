"""The Lorsa shipped in the package (`load_pretrained_default`) loads, splices, and reproduces the held-out FVU
its results.json records. The check runs on the real folder (lorsa_hf/pretrained/smollm2-135m-lorsa, which must
exist: the test fails without it) and on a tiny folder shipped the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lorsa_hf import LorsaForReplacement, load_pretrained_default, pretrained_default_dir, spliced_layers, unsplice
from lorsa_hf.evals.data import pack_texts
from lorsa_hf.evals.reconstruction import reconstruction_metrics
from lorsa_hf.evals.replacements import lorsa_replacements
from lorsa_hf.publishing import PUBLISHED_FILES, check_sidecars

MAX_SHIPPED_BYTES = 40 * 2**20
FVU_NOISE = 2e-3
"""What recomputing the same FVU on the same tokens may move it by (summation order, thread count)."""


def check_reproduces_recorded_fvu(folder: Path, model, tokenizer, texts) -> dict[str, float]:
    """Load the Lorsa of `folder`, splice and unsplice it, and recompute each layer's FVU on the eval rows its
    results.json describes; return the recomputed FVUs after checking them against the recorded ones."""
    results = json.loads((folder / "results.json").read_text())
    lorsa = LorsaForReplacement.from_pretrained(folder)
    reference = next(model.parameters())
    lorsa.to(device=reference.device, dtype=reference.dtype).eval()
    assert lorsa.config.layers == results["lorsa"]["layers"]
    with torch.no_grad():
        prompt = torch.tensor([[tokenizer.bos_token_id or 0, 5, 6, 7, 8]])
        clean = model(prompt).logits
        lorsa.splice(model)
        assert spliced_layers(model) == lorsa.config.layers
        assert not torch.equal(model(prompt).logits, clean)
        unsplice(model)
        assert torch.equal(model(prompt).logits, clean)
    data = results["data"]
    batches = pack_texts(
        texts, tokenizer, data["seq_len"], data["n_eval_tokens"], mean_tokens=data["n_mean_tokens"],
        batch_size=data["batch_size"],
    )
    assert batches.n_eval_tokens == data["n_eval_tokens"]
    accumulators = reconstruction_metrics(
        model, lorsa_replacements(model, lorsa), batches.eval_rows, batches.exclude_token_ids
    )
    recomputed = {}
    for layer in lorsa.config.layers:
        recorded = results["reconstruction"][str(layer)]
        metrics = accumulators[layer].compute()
        assert metrics["n_tokens"] == recorded["n_tokens"]
        assert metrics["fvu"] == pytest.approx(recorded["fvu"], abs=FVU_NOISE)
        assert metrics["l0"] == pytest.approx(recorded["l0"], abs=0.05)
        recomputed[str(layer)] = metrics["fvu"]
    return recomputed


def test_a_tiny_shipped_folder_reproduces_its_fvu(shipped, base_model, tokenizer):
    from tests.evals.conftest import sample_texts

    check_reproduces_recorded_fvu(shipped, base_model, tokenizer, sample_texts())


@pytest.mark.embedded
def test_the_shipped_lorsa_loads_splices_and_reproduces_its_fvu():
    from lorsa_hf import embedded_corpus, load_embedded_model

    folder = pretrained_default_dir()  # FileNotFoundError, naming the ship command, when it is not built
    assert sorted(p.name for p in folder.iterdir()) == sorted(PUBLISHED_FILES)
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_SHIPPED_BYTES
    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert check_sidecars(folder) == list(PUBLISHED_FILES)
    lorsa = load_pretrained_default()
    assert len(lorsa.config.layers) >= 3 and next(lorsa.parameters()).dtype == torch.float32
    model, tokenizer = load_embedded_model()
    check_reproduces_recorded_fvu(folder, model, tokenizer, embedded_corpus("heldout"))


def test_a_missing_shipped_lorsa_names_the_command_that_builds_it():
    with pytest.raises(FileNotFoundError, match="lorsa-hf ship RUN/final lorsa_hf/pretrained/smollm2-135m-lorsa"):
        load_pretrained_default("no-such-lorsa")


def test_the_package_data_ships_every_file_of_the_shipped_folder():
    import fnmatch

    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).resolve().parents[2] / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["lorsa_hf"]
    for name in PUBLISHED_FILES:
        assert any(fnmatch.fnmatch(f"pretrained/smollm2-135m-lorsa/{name}", p) for p in patterns), name
