"""Data of the project's lm-eval tasks, generated at load time (the YAML files here point at these functions).

lm-eval calls each with the task's `dataset_kwargs` and metadata; the generators live in `lorsa_hf.evals`.
"""

from __future__ import annotations

from typing import Any

import datasets

from lorsa_hf.evals.lm_eval import heldout_perplexity_dataset, perplexity_results
from lorsa_hf.evals.synthetic import induction_docs, ioi_docs, successor_docs


def _split(docs: list[dict[str, Any]]) -> dict[str, datasets.Dataset]:
    return {"test": datasets.Dataset.from_list(docs)}


def induction(num_docs: int = 400, seed: int = 1234, **_: Any) -> dict[str, datasets.Dataset]:
    return _split(induction_docs(num_docs=num_docs, seed=seed))


def ioi(num_docs: int = 400, seed: int = 1234, **_: Any) -> dict[str, datasets.Dataset]:
    return _split(ioi_docs(num_docs=num_docs, seed=seed))


def successor(num_docs: int = 400, seed: int = 1234, **_: Any) -> dict[str, datasets.Dataset]:
    return _split(successor_docs(num_docs=num_docs, seed=seed))


def heldout_text(max_docs: int = 100, chunk_chars: int = 2000, **_: Any) -> dict[str, datasets.Dataset]:
    return heldout_perplexity_dataset(max_docs=max_docs, chunk_chars=chunk_chars)


__all__ = ["heldout_text", "induction", "ioi", "perplexity_results", "successor"]
