"""The viewer renders in a real headless Chromium: head cards, tokens shaded by activation, the z-pattern view,
sorting, no network; the screenshot is kept in test-artifacts/analysis/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lorsa_hf.analysis import write_viewer

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "analysis"
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> str:
    found = next((shutil.which(name) for name in ("chromium", "chromium-browser") if shutil.which(name)), None)
    if found is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("Chromium is missing in CI: install it (apt-get install -y chromium) to test the viewer.")
        pytest.skip("Chromium is not installed (apt-get install -y chromium); with CI=true this fails instead.")
    return found


def run_chromium(chromium: str, tmp_path: Path, *arguments: str) -> str:
    profile = tmp_path / f"profile-{len(list(tmp_path.iterdir()))}"
    command = [chromium, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000", *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def context(kind, activation, earlier=()):
    return {
        "kind": kind, "row": 3, "position": 4, "focus": 3, "activation": activation, "tokens": [5, 6, 7, 8, 9],
        "activations": [0.0, 0.5, 0.0, activation, 0.2], "z": [0.1, -0.4, 0.0, 1.5, 0.0], "z_total": 1.2,
        "earlier": [list(e) for e in earlier],
    }


def viewer_data():
    heads = [
        {"head": 17, "group": 2, "frequency": 0.01, "mean": 1.5, "scores": {"induction": 0.9, "successor": 0.1},
         "promoted": [[8, 2.0]], "suppressed": [[9, -1.0]],
         "contexts": [context("top", 2.5, [(1, 9, -3.0)]), context("weak", 0.3)]},
        {"head": 3, "group": 0, "frequency": 0.2, "mean": 0.5, "scores": {"induction": 0.05, "successor": 0.7},
         "promoted": [[6, 1.0]], "suppressed": [[7, -0.5]], "contexts": [context("top", 1.0)]},
    ]
    meta = {"layer": 3, "n_heads": 32, "n_base_heads": 4, "detectors": ["induction", "successor"], "threshold": 0.5,
            "description": "layer 3, 1,000 tokens analysed"}
    tokens = {"5": " the", "6": " cat", "7": "</script>", "8": " sat", "9": "<b>"}
    return {"meta": meta, "counts": {"lorsa": {"induction": 1, "successor": 1}, "base": {"induction": 0,
            "successor": 0}}, "heads": heads, "tokens": tokens}


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    return write_viewer(tmp_path_factory.mktemp("viewer") / "viewer.html", viewer_data(), "Lorsa heads of layer 3")


def test_the_page_renders_head_cards_and_shaded_tokens(chromium, page, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    screenshot = ARTIFACTS / "viewer.png"
    screenshot.unlink(missing_ok=True)
    run_chromium(chromium, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,1000", page.as_uri())
    assert screenshot.is_file() and screenshot.stat().st_size > 10_000
    dom = run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert 'data-rendered="true"' in dom
    assert dom.count('class="head-card"') == 2
    assert dom.index('data-head="3"') < dom.index('data-head="17"')  # sorted by frequency first
    assert 'class="tok shaded focus"' in dom and "rgb(255, 140, 0)" in dom  # the focus token, fully shaded
    assert "&lt;/script&gt;" in dom and "&lt;b&gt;" in dom  # token text is text, never markup
    assert dom.count('data-mode="activation"') == 3


def test_the_z_pattern_view_shades_by_contribution(chromium, page, tmp_path):
    dom = run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri() + "#z")
    assert dom.count('data-mode="z"') == 3
    assert "rgba(40, 110, 255, 0.267)" in dom  # a negative contribution (-0.4 of at most 1.5), in blue


def test_tokens_before_the_window_that_contribute_show_in_the_z_pattern_view_only(chromium, page, tmp_path):
    by_activation = run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri())
    assert len(re.findall(r'class="tok shaded earlier"[^>]*display: none', by_activation)) == 1
    by_z = run_chromium(chromium, tmp_path, "--dump-dom", page.as_uri() + "#z")
    assert '[1]&lt;b&gt;' in by_z and "rgb(40, 110, 255)" in by_z  # the earlier token, position and full blue
    assert not re.findall(r'class="[^"]*earlier[^"]*"[^>]*display: none', by_z)
