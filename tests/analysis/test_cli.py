"""`lorsa-hf analyze` on a saved tiny model, Lorsa and text file writes the viewer; bad input exits with a named
error."""

from __future__ import annotations

import pytest

from lorsa_hf.cli import main


@pytest.fixture
def saved(model, lorsa, tokenizer, texts, tmp_path):
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    lorsa.save_pretrained(tmp_path / "lorsa")
    (tmp_path / "corpus.txt").write_text("\n".join(texts), encoding="utf-8")
    return tmp_path


def arguments(folder, *extra):
    return [
        "analyze", "--base", str(folder / "base"), "--lorsa", str(folder / "lorsa"), "--text-file",
        str(folder / "corpus.txt"), "--seq-len", "16", "--batch-size", "4", "--heads", "4", "--no-progress", *extra,
    ]


def test_analyze_writes_the_viewer_and_prints_the_detector_counts(saved, capsys):
    assert main(arguments(saved, "--layer", "1", "--tokens", "96", "--output", str(saved / "out"))) == 0
    assert (saved / "out" / "viewer.html").is_file() and (saved / "out" / "store.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "induction:" in printed and "wrote" in printed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layer", "2"], "does not replace layer 2"),
        (["--layer", "1", "--top-n", "0"], "must be positive"),
        (["--layer", "1", "--tokens", "0"], "must be positive"),
    ],
)
def test_bad_input_exits_with_a_named_error(saved, capsys, extra, message):
    assert main(arguments(saved, "--output", str(saved / "bad"), *extra)) == 2
    assert message in capsys.readouterr().err


def test_an_empty_corpus_exits_with_a_named_error(saved, capsys):
    (saved / "corpus.txt").write_text("", encoding="utf-8")
    assert main(arguments(saved, "--layer", "1", "--output", str(saved / "empty"))) == 2
    assert "corpus is empty" in capsys.readouterr().err
