"""Running a sweep: a killed sweep resumes without redoing its finished configurations, each configuration is
the run `lorsa-hf train` would make with its recipe, and the summary, table and plot describe them all."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorsa_hf.cli import main
from lorsa_hf.sweeps import make_plan, run_sweep
from lorsa_hf.training import LorsaTrainer, recipe_from_dict

from ..training.conftest import tiny_recipe_dict

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
ROOT = Path(__file__).resolve().parents[2]


def sweep_command(recipe: Path, folder: Path) -> list[str]:
    """Three configurations; the second is long enough (and checkpoints) to be killed in the middle."""
    return [
        sys.executable, "-m", "lorsa_hf.cli", "sweep", str(recipe), "training.max_steps=4,60,4",
        "training.checkpoint_every=10", "--list", "--output-dir", str(folder),
    ]


@pytest.fixture
def recipe_file(tiny_files, tmp_path) -> Path:
    path = tmp_path / "recipe.yaml"
    values = tiny_recipe_dict(tiny_files, tmp_path / "unused", lorsa={"layers": [1]})
    path.write_text(yaml.safe_dump(values))
    return path


def test_a_killed_sweep_resumes_without_redoing_finished_configurations(recipe_file, tmp_path):
    folder = tmp_path / "sweep"
    process = subprocess.Popen(
        sweep_command(recipe_file, folder), env={**ENV, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True
    )
    seen = []
    for line in process.stdout:
        seen.append(line)
        if "001-max_steps=60: training" in line:
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert any("000-max_steps=4: heldout/fvu" in line for line in seen), seen
    first = folder / "runs" / "000-max_steps=4"
    weights = (first / "final" / "model.safetensors").read_bytes()
    stamps = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    assert not (folder / "runs" / "002-max_steps=4").exists()

    rerun = subprocess.run(
        sweep_command(recipe_file, folder), env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=900,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "000-max_steps=4: done before, skipped" in rerun.stdout
    assert "001-max_steps=60: training" in rerun.stdout and "002-max_steps=4: training" in rerun.stdout
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamps
    assert (first / "final" / "model.safetensors").read_bytes() == weights

    summary = json.loads((folder / "sweep.json").read_text())
    assert [row["status"] for row in summary["configurations"]] == ["done"] * 3
    assert [row["metrics"]["tokens"] for row in summary["configurations"]] == [4 * 256, 60 * 256, 4 * 256]
    table = (folder / "sweep.md").read_text()
    assert "| # | training.max_steps | FVU | L0 | dead | loss | tokens | seconds | status |" in table
    assert summary["plots"] == ["fvu_vs_max_steps.png"] and (folder / "fvu_vs_max_steps.png").is_file()


def test_a_configuration_is_the_run_train_makes_with_its_recipe(recipe_file, tmp_path, capsys):
    plan = make_plan(str(recipe_file), ["lorsa.top_k=2,4", "training.max_steps=6"], output_dir=str(tmp_path / "s"))
    assert run_sweep(plan) == []
    values = json.loads((tmp_path / "s" / "runs" / "001-top_k=4" / "recipe.json").read_text())
    alone = recipe_from_dict({**values, "output_dir": str(tmp_path / "alone")})
    LorsaTrainer(alone).train()
    swept = load_file(str(tmp_path / "s" / "runs" / "001-top_k=4" / "final" / "model.safetensors"))
    single = load_file(str(tmp_path / "alone" / "final" / "model.safetensors"))
    assert all(torch.equal(swept[k], single[k]) for k in single)
    assert main(["sweep", str(recipe_file), "lorsa.top_k=2,4", "training.max_steps=6", "--output-dir",
                 str(tmp_path / "s")]) == 0
    assert capsys.readouterr().out.count("done before, skipped") == 2
    with pytest.raises(SystemExit):
        main(["sweep", str(recipe_file), "lorsa.top_k=2,8", "--output-dir", str(tmp_path / "s")])
    assert "holds another sweep" in capsys.readouterr().err


def test_the_processes_of_a_launch_take_their_share_of_the_configurations(recipe_file, tmp_path):
    """Two processes (`accelerate launch`, gloo on CPU): process 0 trains configurations 0 and 2, process 1
    trains 1, each as a one-process run, with the weights a one-process sweep gives."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    arguments = ["lorsa.top_k=2,4,8", "training.max_steps=4"]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
        "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), "-m",
        "lorsa_hf.cli", "sweep", str(recipe_file), *arguments, "--output-dir", str(tmp_path / "launched"),
    ]
    result = subprocess.run(command, env={**ENV, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    trained = [line.split()[1].rstrip(":") for line in result.stdout.splitlines() if line.endswith(": training")]
    assert sorted(trained) == ["000-top_k=2", "001-top_k=4", "002-top_k=8"]
    assert run_sweep(make_plan(str(recipe_file), arguments, output_dir=str(tmp_path / "alone"))) == []
    for name in trained:
        launched = load_file(str(tmp_path / "launched" / "runs" / name / "final" / "model.safetensors"))
        alone = load_file(str(tmp_path / "alone" / "runs" / name / "final" / "model.safetensors"))
        assert all(torch.equal(launched[k], alone[k]) for k in alone)
    summary = json.loads((tmp_path / "launched" / "sweep.json").read_text())
    assert [row["status"] for row in summary["configurations"]] == ["done"] * 3
