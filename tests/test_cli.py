"""The `lorsa-hf` command line."""

from __future__ import annotations

import pytest

from lorsa_hf.cli import main


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
    for command in ("demo", "embedded", "convert", "train", "eval"):
        assert command in help_text
