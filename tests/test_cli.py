"""The `lorsa-hf` command line."""

from __future__ import annotations

import pytest

from lorsa_hf.cli import main
from tests.conftest import embedded_model_unavailable_reason


def test_tiny_demo_splices_generates_and_unsplices(capsys):
    assert main(["demo", "--tiny"]) == 0
    out = capsys.readouterr().out
    assert "cached generation == recomputing every step: True" in out
    assert "unsplice restores bit-identical logits: True" in out
    assert "round trip exact: True" in out


def test_every_subcommand_is_registered(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for command in ("demo", "embedded", "convert", "train", "eval", "ship", "push"):
        assert command in help_text


@pytest.mark.embedded
def test_main_job_evaluates_the_shipped_lorsa_and_generates_beside_the_clean_model(tmp_path, capsys):
    reason = embedded_model_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    assert main(["demo", "--output-dir", str(tmp_path), "--eval-tokens", "512", "--limit", "4"]) == 0
    out = capsys.readouterr().out
    for column in ("layers spliced", "FVU", "L0", "dead", "CE", "KL", "loss rec."):
        assert column in out
    assert out.count("    spliced: ") == 3 and "lm-eval lorsa_induction acc" in out
    assert "cached generation == recomputing every step: True" in out
    assert "unsplice restores bit-identical logits: True" in out
    assert (tmp_path / "eval" / "report.md").exists() and (tmp_path / "eval" / "generations.md").exists()


@pytest.mark.embedded
def test_demo_train_trains_evaluates_and_generates_on_the_embedded_model(tmp_path, capsys):
    reason = embedded_model_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    assert main(["demo", "--train", "--output-dir", str(tmp_path), "--tokens", "4096", "--eval-tokens", "1024"]) == 0
    out = capsys.readouterr().out
    assert "Lorsa: 4608 heads in 9 QK groups, top_k 64" in out
    assert "loss recovered" in out and "KL" in out
    assert "cached generation == recomputing every step: True" in out
    assert "unsplice restores bit-identical logits: True" in out
    assert (tmp_path / "train" / "final" / "model.safetensors").exists()
    assert (tmp_path / "eval" / "report.md").exists()
