"""Two CPU processes (gloo, started by `accelerate launch`) each stream half of the rows; the stores gathered
through accelerate merge into the single-process store."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from lorsa_hf.analysis import CorpusOptions, HeadActivationStore, analyze_corpus

from .test_stream import assert_same_store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_gathered_through_accelerate_give_the_single_process_store(
    model, lorsa, tokenizer, texts, tmp_path
):
    root = Path(__file__).resolve().parents[2]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "tests.analysis.gather_run", str(tmp_path),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(command, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    single = analyze_corpus(model, lorsa, 1, texts, tokenizer, CorpusOptions(16, 16 * 9, 2), top_n=5,
                            sample_size=6, progress=False)
    assert_same_store(HeadActivationStore.load(tmp_path / "merged.safetensors"), single)
