"""Two CPU processes (gloo) launched by `accelerate launch`: DDP, layer-distributed and FSDP training against one
process on the same global batches, and an FSDP run resumed from its sharded-then-gathered checkpoint.

Layer-distributed mode does exactly the single-process arithmetic for each layer (its owner sees the whole
batch), so the weights are equal. DDP averages gradients of per-process halves; the loss is normalised by the
global token count so the averaged gradient is the full-batch gradient up to float rounding, which Adam can
amplify (a near-zero gradient whose sign flips moves a weight by ~2 lr): equal losses, weights within a few
lr. FSDP reduce-scatters the same averaged gradients.

`accelerate launch --cpu --num_processes 2` starts multi-CPU jobs through mpirun only (accelerate 1.x), so the
processes are started the torchrun way (`--multi_gpu`); on a machine without GPUs the trainer asks accelerate
for CPU processes, which then use gloo.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorsa_hf.cli import main

from .conftest import tiny_recipe_dict


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(recipe_path, *overrides) -> None:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()), "-m", "lorsa_hf.cli", "train", str(recipe_path), *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def runs(tiny_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    values = tiny_recipe_dict(
        tiny_files, root / "single",
        training={"max_steps": 8, "checkpoint_every": 4, "log_every": 1, "k_anneal_fraction": 0.5},
        init={"qk": "base", "ov": "base", "match_norm": True},
    )
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    assert main(["train", str(path)]) == 0
    _launch(path, f"output_dir={root / 'ddp'}", "training.distribute=ddp")
    _launch(path, f"output_dir={root / 'layers'}", "training.distribute=layers")
    _launch(path, f"output_dir={root / 'fsdp'}", "training.distribute=fsdp")
    shutil.copytree(root / "fsdp", root / "fsdp-resumed", ignore=shutil.ignore_patterns("final"))
    _launch(path, f"output_dir={root / 'fsdp-resumed'}", "training.distribute=fsdp", "--resume")
    return root


def _weights(folder):
    return load_file(str(folder / "final" / "model.safetensors"))


def _losses(folder):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]


def _world_size(folder):
    return json.loads((folder / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())["world_size"]


def test_layer_distributed_equals_one_process(runs):
    assert _world_size(runs / "layers") == 2
    shards = sorted(p.name for p in (runs / "layers" / "checkpoints" / "step-00000004").glob("training_state-*"))
    assert shards == ["training_state-rank0.pt", "training_state-rank1.pt"]  # each process trained one layer
    single, distributed = _weights(runs / "single"), _weights(runs / "layers")
    for name in single:
        assert torch.equal(single[name], distributed[name]), name
    assert _losses(runs / "layers") == pytest.approx(_losses(runs / "single"), rel=1e-6)


def test_ddp_matches_one_process(runs):
    assert _world_size(runs / "ddp") == 2
    # The all-reduce sums the gradients in another order. Adam divides by the gradient's size, so rounding in
    # near-zero components shows up in the update, and a TopK near-tie can then flip: losses agree to a few 1e-4.
    assert _losses(runs / "ddp") == pytest.approx(_losses(runs / "single"), rel=1e-3)
    single, distributed = _weights(runs / "single"), _weights(runs / "ddp")
    for name in single:
        torch.testing.assert_close(distributed[name], single[name], atol=1e-2, rtol=1e-2)
    final = json.loads((runs / "ddp" / "final" / "final_metrics.json").read_text())
    reference = json.loads((runs / "single" / "final" / "final_metrics.json").read_text())
    assert final["heldout/fvu"] == pytest.approx(reference["heldout/fvu"], rel=1e-3)


def test_fsdp_matches_one_process_and_resumes_exactly(runs):
    assert _world_size(runs / "fsdp") == 2
    assert _losses(runs / "fsdp") == pytest.approx(_losses(runs / "single"), rel=1e-3)  # as with DDP
    single, sharded = _weights(runs / "single"), _weights(runs / "fsdp")
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], atol=1e-2, rtol=1e-2)
    resumed = _weights(runs / "fsdp-resumed")
    for name in sharded:
        assert torch.equal(resumed[name], sharded[name]), name
