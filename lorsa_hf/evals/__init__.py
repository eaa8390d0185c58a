"""Evals of a Lorsa: reconstruction at each replaced block, downstream loss of the spliced model, lm-eval deltas,
and the report and model card written from them. `evaluate_lorsa` runs them all, as `EvalOptions` says."""

from .card import model_card, write_model_card
from .data import EvalBatches, pack_texts, position_mask
from .downstream import attention_output_means, downstream_metrics, loss_recovered
from .lm_eval import DEFAULT_TASKS, lm_eval_deltas, perplexity_task, run_lm_eval
from .options import EvalOptions
from .reconstruction import ReconstructionAccumulator, reconstruction_metrics
from .replacements import (
    MeanAblation,
    ZeroAblation,
    lorsa_replacements,
    original_attention,
    replaced_attention,
)
from .report import load_results, render_markdown, write_report
from .runner import evaluate_lorsa

__all__ = [
    "DEFAULT_TASKS",
    "EvalBatches",
    "EvalOptions",
    "MeanAblation",
    "ReconstructionAccumulator",
    "ZeroAblation",
    "attention_output_means",
    "downstream_metrics",
    "evaluate_lorsa",
    "lm_eval_deltas",
    "load_results",
    "loss_recovered",
    "lorsa_replacements",
    "model_card",
    "original_attention",
    "pack_texts",
    "perplexity_task",
    "position_mask",
    "reconstruction_metrics",
    "render_markdown",
    "replaced_attention",
    "run_lm_eval",
    "write_model_card",
    "write_report",
]
