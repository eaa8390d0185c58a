"""The Lorsa eval suite: reconstruction, downstream loss and lm-eval deltas of a Lorsa, in one command.

    python evals/run.py --base embedded --lorsa path/to/lorsa --output eval-results
    python evals/run.py --base EleutherAI/pythia-160m --lorsa path/to/lorsa --layers 3 5 --tasks lorsa_induction

Same options as `lorsa-hf eval` (see `--help` and docs/evals.md); this entry point also makes the task definitions
in `evals/tasks/` beside it the default ones, wherever the package is installed from.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lorsa_hf.cli import main
from lorsa_hf.evals.lm_eval import TASKS_ENV

if __name__ == "__main__":
    os.environ.setdefault(TASKS_ENV, str(Path(__file__).resolve().parent / "tasks"))
    raise SystemExit(main(["eval", *sys.argv[1:]]))
