"""`EvalOptions`: what `evaluate_lorsa` measures and with how much data (the `lorsa-hf eval` flags)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .lm_eval import DEFAULT_TASKS


@dataclass(frozen=True)
class EvalOptions:
    """Settings of one `evaluate_lorsa` run; every field has the default `lorsa-hf eval` uses.

    Args:
        layers: Which of the Lorsa's layers to evaluate (default: all).
        tasks: lm-eval task names or inline configs; empty or None skips lm-eval.
        n_tokens, mean_tokens: Tokens for the metrics and, before them, for the mean-ablation statistics.
        seq_len, batch_size: Rows of held-out text the metrics run on.
        lm_eval_limit: Documents per lm-eval task (default: all); `lm_eval_batch_size`, `bootstrap_iters` and
            `include_path` (an extra folder of task YAMLs) also go to lm-eval.
        seed: Seeds torch before anything runs and lm-eval's sampling.
        device, dtype: Where and in what precision the base model and the Lorsa run.
        progress: Progress bars.
    """

    layers: Sequence[int] | None = None
    tasks: Sequence[str | dict[str, Any]] | None = DEFAULT_TASKS
    n_tokens: int = 16_384
    mean_tokens: int = 4_096
    seq_len: int = 256
    batch_size: int = 8
    lm_eval_limit: int | float | None = None
    lm_eval_batch_size: int = 8
    bootstrap_iters: int = 1000
    include_path: str | os.PathLike | None = None
    seed: int = 0
    device: str | torch.device | None = None
    dtype: torch.dtype = torch.float32
    progress: bool = True


__all__ = ["EvalOptions"]
