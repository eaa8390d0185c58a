"""The training tests' tiny model, tokenizer and text files (sweeps train them)."""

from ..training.conftest import tiny_files, tokenizer

__all__ = ["tiny_files", "tokenizer"]
