"""The importer's test oracle: `tests/fixtures/` (see its README), holding tiny base models, checkpoints written by
the two reference implementations, and what those computed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
LAYER = 1
LLAMASCOPIUM_VARIANTS = ("lorsa_llamascopium_unfolded", "lorsa_llamascopium_folded")
FIXTURE_ARCHITECTURES = ("gpt_neox", "llama", "qwen3")


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The fixtures folder; a missing one fails every test that needs it (a skip would hide a broken checkout)."""
    if not (FIXTURES / "README.md").is_file():
        pytest.fail(f"importer fixtures not found at {FIXTURES}: they are part of the repository (tests/fixtures/).")
    return FIXTURES


@pytest.fixture(scope="session")
def io(fixtures: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Recorded inputs and outputs, per architecture."""
    return {arch: load_file(fixtures / arch / "io.safetensors") for arch in FIXTURE_ARCHITECTURES}


@pytest.fixture(scope="session")
def bases(fixtures: Path) -> dict[str, torch.nn.Module]:
    """The fixture base models, loaded once (eager attention, as when the fixtures were recorded)."""
    return {
        arch: AutoModelForCausalLM.from_pretrained(fixtures / "base" / arch, attn_implementation="eager").eval()
        for arch in FIXTURE_ARCHITECTURES
    }


def copy_checkpoint(source: Path, target: Path) -> Path:
    """A writable copy of a fixture checkpoint folder, so that a test never changes the fixtures themselves."""
    shutil.copytree(source, target)
    for file in target.iterdir():
        file.chmod(0o644)
    target.chmod(0o755)
    return target


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(cache: Path, repo_id: str, files_from: dict[str, Path]) -> None:
    """Lay `files_from` (path in repo -> local folder) out as huggingface_hub's cache holds a downloaded repo."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    for inside, folder in files_from.items():
        shutil.copytree(folder, snapshot / inside if inside else snapshot, dirs_exist_ok=True)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
