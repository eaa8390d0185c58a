"""Where checkpoints come from: one subfolder per layer, Hub repos (repo id + subfolder + revision, served from a
local Hugging Face cache folder, never the network), and the `lorsa-hf convert` command."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorsa_hf import CheckpointError, LorsaForReplacement, convert_checkpoint
from lorsa_hf.cli import main
from lorsa_hf.convert import foreign_format

from .conftest import COMMIT, LAYER, copy_checkpoint, hub_cache

ATOL = 1e-4


def _as_layer(folder: Path, layer: int) -> Path:
    """Rewrite a llamascopium checkpoint's hook points so it claims to replace `layer`."""
    config = json.loads((folder / "config.json").read_text())
    config.update(hook_point_in=f"blocks.{layer}.ln1.hook_normalized", hook_point_out=f"blocks.{layer}.hook_attn_out")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def per_layer(fixtures: Path, tmp_path: Path) -> Path:
    """A folder with one llamascopium checkpoint subfolder per layer (layers 0 and 1 of the GPTNeoX fixture)."""
    root = tmp_path / "pythia-lorsas"
    root.mkdir()
    copy_checkpoint(fixtures / "gpt_neox" / "lorsa_llamascopium_folded", root / "L1")
    _as_layer(copy_checkpoint(fixtures / "gpt_neox" / "lorsa_llamascopium_folded", root / "L0"), 0)
    (root / "README.md").write_text("one subfolder per layer")
    return root


def _output(lorsa: LorsaForReplacement, io, layer: int = LAYER) -> torch.Tensor:
    with torch.no_grad():
        return lorsa(io["gpt_neox"]["hf_attn_in"], layer=layer).hidden_states


def test_one_subfolder_per_layer(per_layer: Path, io, bases) -> None:
    base = bases["gpt_neox"]
    conversion = convert_checkpoint(per_layer, base)
    lorsa = conversion.lorsa
    assert lorsa.config.layers == [0, 1]
    assert [entry.layer for entry in conversion.report.layers] == [0, 1]
    torch.testing.assert_close(_output(lorsa, io), io["gpt_neox"]["lorsa_out_llamascopium"], atol=ATOL, rtol=0)
    alone = convert_checkpoint(per_layer / "L0", base).lorsa
    for name, tensor in alone.layer(0).state_dict().items():
        torch.testing.assert_close(lorsa.layer(0).state_dict()[name], tensor, atol=0, rtol=0)

    only_one = convert_checkpoint(per_layer, base, layers=1).lorsa
    assert only_one.config.layers == [1]
    with pytest.raises(CheckpointError, match=r"no Lorsa for layer\(s\) \[5\]; it holds layers \[0, 1\]"):
        convert_checkpoint(per_layer, base, layers=[1, 5])


def test_per_layer_folders_must_agree(per_layer: Path, bases) -> None:
    config = json.loads((per_layer / "L0" / "config.json").read_text())
    (per_layer / "L0" / "config.json").write_text(json.dumps({**config, "top_k": 4}))
    with pytest.raises(CheckpointError, match="differ in top_k"):
        convert_checkpoint(per_layer, bases["gpt_neox"])
    _as_layer(per_layer / "L0", 1)
    with pytest.raises(CheckpointError, match="both replace layer 1"):
        convert_checkpoint(per_layer, bases["gpt_neox"])


def test_hub_repo_with_subfolder_and_revision(fixtures: Path, per_layer: Path, io, tmp_path: Path) -> None:
    cache = tmp_path / "hub-cache"
    hub_cache(cache, "someone/lorsa-pythia", {"pythia-70m-tiny": per_layer})
    hub_cache(cache, "someone/tiny-neox", {"": fixtures / "base" / "gpt_neox"})
    hub = dict(subfolder="pythia-70m-tiny", cache_dir=cache)

    conversion = convert_checkpoint("someone/lorsa-pythia", "someone/tiny-neox", revision=COMMIT, **hub)
    assert conversion.lorsa.config.layers == [0, 1]
    assert conversion.lorsa.config.base_model_name_or_path == "someone/tiny-neox"
    assert conversion.report.layers[1].source == f"someone/lorsa-pythia/pythia-70m-tiny/L1@{COMMIT}"
    torch.testing.assert_close(
        _output(conversion.lorsa, io), io["gpt_neox"]["lorsa_out_llamascopium"], atol=ATOL, rtol=0
    )

    assert foreign_format("someone/lorsa-pythia", **hub) == "llamascopium"
    loaded = LorsaForReplacement.from_pretrained("someone/lorsa-pythia", base_model="someone/tiny-neox", **hub)
    assert loaded.config.layers == [0, 1]
    torch.testing.assert_close(_output(loaded, io), io["gpt_neox"]["lorsa_out_llamascopium"], atol=ATOL, rtol=0)

    colon = convert_checkpoint("someone/lorsa-pythia:pythia-70m-tiny/L1", "someone/tiny-neox", cache_dir=cache)
    assert colon.lorsa.config.layers == [1]

    with pytest.raises(CheckpointError, match="no Lorsa files under 'elsewhere'"):
        convert_checkpoint("someone/lorsa-pythia", "someone/tiny-neox", subfolder="elsewhere", cache_dir=cache)
    with pytest.raises(CheckpointError, match="no local folder and the Hub answered"):
        convert_checkpoint("someone/not-cached", "someone/tiny-neox", cache_dir=cache)


def test_cli_convert_writes_a_native_checkpoint(fixtures: Path, io, tmp_path: Path, capsys) -> None:
    out = tmp_path / "converted"
    source = fixtures / "gpt_neox" / "lorsa_paper_era"
    assert main(["convert", str(source), str(out), "--base", str(fixtures / "base" / "gpt_neox"), "--layer", "1"]) == 0
    printed = capsys.readouterr().out
    assert "layer 1: paper_era checkpoint" in printed and "topk_abs" in printed
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["layers"][0]["activation"] == "topk_abs"

    assert foreign_format(out) is None
    reloaded = LorsaForReplacement.from_pretrained(out)
    torch.testing.assert_close(_output(reloaded, io), io["gpt_neox"]["lorsa_out_paper_era"], atol=ATOL, rtol=0)


def test_cli_trap_option_and_errors(fixtures: Path, io, tmp_path: Path, capsys) -> None:
    run = tmp_path / "finished_run"
    run.mkdir()
    shutil.copyfile(fixtures / "llama" / "lorsa_llamascopium_unfolded" / "config.json", run / "config.json")
    shutil.copyfile(
        fixtures / "llama" / "lorsa_llamascopium_folded" / "sae_weights.safetensors", run / "sae_weights.safetensors"
    )
    out = tmp_path / "converted"
    base = str(fixtures / "base" / "llama")
    assert main(["convert", str(run), str(out), "--base", base, "--weights-already-folded"]) == 0
    reloaded = LorsaForReplacement.from_pretrained(out)
    with torch.no_grad():
        output = reloaded(io["llama"]["hf_attn_in"]).hidden_states
    torch.testing.assert_close(output, io["llama"]["lorsa_out_llamascopium"], atol=ATOL, rtol=0)

    capsys.readouterr()
    assert main(["convert", str(run), str(tmp_path / "wrong"), "--base", base, "--layer", "0"]) == 2
    assert "trained for layer 1, not [0]" in capsys.readouterr().err
    assert not (tmp_path / "wrong").exists()
