"""lm-eval on the clean and on the spliced model: same tasks, same settings, and the difference of each metric
with its standard error.

The model is wrapped in lm-eval's `HFLM` in memory; the spliced run swaps the replacements into the attention
slots for its duration. The default tasks are the project's own (`lorsa_hf/evals/tasks/`, package data), which need
no download; any task lm-eval knows works too when its data is reachable.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..resources import bundled_dir
from .replacements import replaced_attention
from .synthetic import text_chunks

DEFAULT_TASKS = ("lorsa_heldout_ppl", "lorsa_induction", "lorsa_ioi", "lorsa_successor")
TASKS_ENV = "LORSA_HF_EVAL_TASKS"
PERPLEXITY_METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")
PERPLEXITY_AGGREGATIONS = ("weighted_perplexity", "weighted_perplexity", "bits_per_byte")


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise ImportError("lm-eval is not installed: pip install 'lorsa-hf[eval]' (or pip install lm-eval).") from error


def default_tasks_dir() -> Path:
    """The project's task definitions: `$LORSA_HF_EVAL_TASKS`, else the `tasks/` folder bundled beside this module."""
    if os.environ.get(TASKS_ENV):
        return Path(os.environ[TASKS_ENV]).expanduser()
    return bundled_dir("evals", "tasks")


def perplexity_results(doc: dict[str, Any], results: tuple[float]) -> dict[str, tuple[float, int]]:
    """lm-eval `process_results` of a rolling-loglikelihood task on `doc["text"]`: words and bytes per doc."""
    (loglikelihood,) = results
    text = doc["text"]
    n_bytes = len(text.encode("utf-8"))
    return {
        "word_perplexity": (loglikelihood, len(text.split())),
        "byte_perplexity": (loglikelihood, n_bytes),
        "bits_per_byte": (loglikelihood, n_bytes),
    }


def perplexity_dataset(texts: Sequence[str]) -> dict[str, Any]:
    """A `test` split of `{"text"}` documents, as lm-eval's `custom_dataset` returns it."""
    import datasets

    return {"test": datasets.Dataset.from_list([{"text": text} for text in texts])}


def perplexity_task(texts: Sequence[str], name: str = "lorsa_text_ppl") -> dict[str, Any]:
    """An inline lm-eval task config: word/byte perplexity and bits per byte of the model on `texts`."""
    texts = list(texts)
    if not texts:
        raise ValueError("perplexity_task needs at least one text.")
    return {
        "task": name,
        "custom_dataset": lambda **_: perplexity_dataset(texts),
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "text",
        "process_results": perplexity_results,
        "metric_list": [
            {"metric": metric, "aggregation": aggregation, "higher_is_better": False}
            for metric, aggregation in zip(PERPLEXITY_METRICS, PERPLEXITY_AGGREGATIONS, strict=True)
        ],
        "metadata": {"version": 1.0},
    }


def heldout_perplexity_dataset(max_docs: int = 100, chunk_chars: int = 2000, **_: Any) -> dict[str, Any]:
    """The `lorsa_heldout_ppl` data: the held-out split of the embedded corpus in chunks of ~`chunk_chars`
    characters, interleaved across its documents, at most `max_docs` of them."""
    from ..embedded.corpus import embedded_corpus

    return perplexity_dataset(text_chunks(embedded_corpus("heldout"), chunk_chars=chunk_chars, max_chunks=max_docs))


def make_task_manager(tasks: Sequence[str | dict[str, Any]], include_path: str | os.PathLike | None = None) -> Any:
    """A `TaskManager` that knows the project's tasks (and `include_path`'s); lm-eval's own ~15k task
    definitions are indexed (slow) only when a requested name is not among ours."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    paths = [str(default_tasks_dir())] if default_tasks_dir().is_dir() else []
    if include_path is not None:
        paths.append(str(include_path))
    names = [task for task in tasks if isinstance(task, str)]
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    if all(name in manager.all_tasks for name in names):
        return manager
    manager = TaskManager(include_path=paths or None, include_defaults=True)
    missing = [name for name in names if name not in manager.all_tasks]
    if missing:
        where = f"{', '.join(paths)} nor lm-eval's own tasks" if paths else "lm-eval's own tasks"
        raise ValueError(
            f"Unknown lm-eval task(s) {missing}: neither {where} define them. The project's tasks live in "
            f"lorsa_hf/evals/tasks (set ${TASKS_ENV} or pass include_path= / --include-path)."
        )
    return manager


@dataclass
class LmEvalRun:
    """The numbers of one lm-eval run: `metrics[task][metric]`, their standard errors, samples per task, and
    each document's metric values (for paired differences)."""

    metrics: dict[str, dict[str, float]]
    stderr: dict[str, dict[str, float | None]]
    n_samples: dict[str, int]
    higher_is_better: dict[str, dict[str, bool]]
    versions: dict[str, Any]
    per_doc: dict[str, dict[str, dict[int, Any]]] = field(repr=False, default_factory=dict)


def _metric_name(key: str) -> tuple[str, str]:
    name, _, filter_name = key.partition(",")
    return name, filter_name or "none"


def _parse(output: dict[str, Any]) -> LmEvalRun:
    metrics: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float | None]] = {}
    for task, values in output["results"].items():
        metrics[task], stderr[task] = {}, {}
        for key, value in values.items():
            name, filter_name = _metric_name(key)
            if key in ("alias", "sample_len") or name.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            label = name if filter_name == "none" else f"{name},{filter_name}"
            metrics[task][label] = float(value)
            error = values.get(f"{name}_stderr,{filter_name}")
            stderr[task][label] = float(error) if isinstance(error, (int, float)) else None
    per_doc: dict[str, dict[str, dict[int, Any]]] = {}
    for task, samples in (output.get("samples") or {}).items():
        table: dict[str, dict[int, Any]] = {}
        for sample in samples:
            if sample.get("filter", "none") != "none":
                continue
            for label in metrics.get(task, {}):
                value = sample.get(label)
                if isinstance(value, (int, float)):
                    table.setdefault(label, {})[int(sample["doc_id"])] = float(value)
                elif label in PERPLEXITY_METRICS and isinstance(value, (list, tuple)) and len(value) == 2:
                    table.setdefault(label, {})[int(sample["doc_id"])] = (float(value[0]), float(value[1]))
        per_doc[task] = table
        for label, values in table.items():  # lm-eval gives no standard error for the perplexity metrics
            if label in PERPLEXITY_METRICS and stderr[task].get(label) is None:
                pairs = [values[i] for i in sorted(values)]
                stderr[task][label] = _perplexity_stderr(label, metrics[task][label], pairs)
    n_samples = {task: int(counts.get("effective", 0)) for task, counts in output.get("n-samples", {}).items()}
    higher = {
        task: {label: bool(flag) for label, flag in flags.items()}
        for task, flags in output.get("higher_is_better", {}).items()
    }
    return LmEvalRun(metrics, stderr, n_samples, higher, dict(output.get("versions", {})), per_doc)


def run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str | dict[str, Any]] = DEFAULT_TASKS,
    *,
    task_manager: Any = None,
    include_path: str | os.PathLike | None = None,
    batch_size: int = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    max_length: int | None = None,
) -> LmEvalRun:
    """Evaluate the in-memory `model` with lm-eval's `HFLM` on `tasks` (names or inline configs)."""
    _require_lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    manager = task_manager if task_manager is not None else make_task_manager(tasks, include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    output = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
        log_samples=True,
    )
    return _parse(output)


def _ratio_stderr(pairs: list[tuple[float, float]]) -> float | None:
    """Standard error of Σy / Σn over documents (y_i, n_i), by the ratio estimator (documents differ in length)."""
    m = len(pairs)
    if m < 2:
        return None
    y = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    n = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    ratio = y.sum() / n.sum()
    return float(torch.sqrt((y - ratio * n).pow(2).sum() * m / (m - 1)) / n.sum())


def _perplexity_stderr(metric: str, value: float, pairs: list[tuple[float, float]]) -> float | None:
    """Standard error of a perplexity metric from per-document (loglikelihood, words or bytes): bits per byte is
    −ratio / ln 2, a perplexity exp(−ratio), whose error follows by the delta method."""
    ratio_stderr = _ratio_stderr(pairs)
    if ratio_stderr is None:
        return None
    return ratio_stderr / math.log(2) if metric == "bits_per_byte" else value * ratio_stderr


def _delta_stderr(
    clean: LmEvalRun, spliced: LmEvalRun, task: str, metric: str
) -> tuple[float | None, str | None]:
    """Standard error of spliced − clean: paired over documents where each document has a value (the two
    runs score the same documents), else from the two standard errors as if independent."""
    a = clean.per_doc.get(task, {}).get(metric, {})
    b = spliced.per_doc.get(task, {}).get(metric, {})
    if a and a.keys() == b.keys() and len(a) == clean.n_samples.get(task, len(a)) and len(a) > 1:
        if metric in PERPLEXITY_METRICS:
            pairs = [(b[i][0] - a[i][0], a[i][1]) for i in sorted(a)]
            scale = (clean.metrics[task][metric] + spliced.metrics[task][metric]) / 2
            return _perplexity_stderr(metric, scale, pairs), "paired"
        diffs = torch.tensor([b[i] - a[i] for i in sorted(a)], dtype=torch.float64)
        return float(diffs.std(unbiased=True) / math.sqrt(len(diffs))), "paired"
    se_a, se_b = clean.stderr[task].get(metric), spliced.stderr[task].get(metric)
    if se_a is None or se_b is None:
        return None, None
    return math.sqrt(se_a**2 + se_b**2), "independent"


def compare_runs(clean: LmEvalRun, spliced: LmEvalRun) -> dict[str, dict[str, dict[str, Any]]]:
    """Each task metric of both runs, their difference (spliced − clean) and its standard error."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for task, metrics in clean.metrics.items():
        table[task] = {}
        for metric, value in metrics.items():
            other = spliced.metrics.get(task, {}).get(metric)
            if other is None:
                continue
            delta_stderr, kind = _delta_stderr(clean, spliced, task, metric)
            table[task][metric] = {
                "clean": value,
                "clean_stderr": clean.stderr[task].get(metric),
                "spliced": other,
                "spliced_stderr": spliced.stderr[task].get(metric),
                "delta": other - value,
                "delta_stderr": delta_stderr,
                "delta_stderr_kind": kind,
                "higher_is_better": clean.higher_is_better.get(task, {}).get(metric),
                "n_samples": clean.n_samples.get(task),
            }
    return table


def lm_eval_deltas(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    replacements: Mapping[int, nn.Module],
    tasks: Sequence[str | dict[str, Any]] = DEFAULT_TASKS,
    *,
    include_path: str | os.PathLike | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval on the clean model and with `replacements` in its attention slots (same tasks, settings and
    seed); return the per-metric comparison and the task versions. `kwargs` go to `run_lm_eval`."""
    manager = make_task_manager(tasks, include_path)
    clean = run_lm_eval(model, tokenizer, tasks, task_manager=manager, **kwargs)
    with replaced_attention(model, replacements):
        spliced = run_lm_eval(model, tokenizer, tasks, task_manager=manager, **kwargs)
    return {"tasks": compare_runs(clean, spliced), "versions": clean.versions, "settings": dict(kwargs)}


__all__ = [
    "DEFAULT_TASKS",
    "LmEvalRun",
    "compare_runs",
    "default_tasks_dir",
    "heldout_perplexity_dataset",
    "lm_eval_deltas",
    "make_task_manager",
    "perplexity_results",
    "perplexity_task",
    "run_lm_eval",
]
