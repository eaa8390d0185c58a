"""A tiny byte-level BPE tokenizer trained in memory, and a tiny base model whose vocabulary matches it."""

from __future__ import annotations

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lorsa_hf.evals.synthetic import induction_docs, ioi_docs, successor_docs
from tests.conftest import VOCAB, make_base

TOKENIZER_VOCAB = 320
BOS = 0


def batches(seed: int, n_batches: int = 2, batch_size: int = 2, seq_len: int = 16) -> list[torch.Tensor]:
    """Random token rows for the tiny base model (`tests.conftest.VOCAB`), each starting with BOS."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n_batches):
        ids = torch.randint(3, VOCAB, (batch_size, seq_len), generator=generator)
        ids[:, 0] = BOS
        rows.append(ids)
    return rows


def sample_texts(n: int = 60) -> list[str]:
    """Plain text for the tests: the synthetic task prompts with their answers, as running sentences."""
    docs = induction_docs(n, seed=5) + ioi_docs(n, seed=5) + successor_docs(n, seed=5)
    return [f"{doc['context']} {doc['choices'][doc['label']]}." for doc in docs]


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(sample_texts(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<pad>"
    )


def make_lm(arch: str, tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    """A tiny random base model over `tokenizer`'s vocabulary (BOS/EOS 0, padding 1)."""
    return make_base(arch, seed=seed, vocab_size=len(tokenizer), max_position_embeddings=256)
